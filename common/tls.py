"""TLS for the Deployment Engine: a self-signed CA plus a SuperLink server certificate signed
by it, for ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt
--ssl-keyfile server.key`` and ``flower-supernode --root-certificates ca.crt``.

Files are written as :mod:`fedlora.common.credentials` writes keys: never over an existing file
unless ``force=True``, private keys created with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.common.credentials import prepare_targets, private_bytes, write_private_key, write_public_file

_CLOCK_SKEW = dt.timedelta(minutes=5)


# --------------------------------------------------------------------------- #
# TLS certificates (SuperLink)
# --------------------------------------------------------------------------- #
def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """Turn host strings into SAN entries: IPs as IPAddress, the rest as DNSName."""
    entries: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise ValueError("Empty host name in hosts; list IP addresses or DNS names.")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    if not entries:
        raise ValueError(
            "hosts is empty: the server certificate needs at least one IP address "
            "or DNS name the SuperNodes will connect to."
        )
    return entries


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """digitalSignature always; keyCertSign and cRLSign only for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _build_ca(
    key: ec.EllipticCurvePrivateKey, *, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedlora local CA"),
        ]
    )
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _build_server_cert(
    key: ec.EllipticCurvePrivateKey,
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    common_name: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def write_tls_certificates(
    out_dir: Path | str,
    *,
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
    force: bool = False,
) -> dict[str, Path]:
    """Create a self-signed CA and a SuperLink server certificate signed by it.

    Keys are ECDSA P-256 (accepted by gRPC/BoringSSL), PKCS8 PEM, mode 0600.
    The server certificate carries a SubjectAlternativeName for every entry of
    ``hosts`` (IP addresses as ``IPAddress``, everything else as ``DNSName``),
    ``basicConstraints CA:FALSE``, ``keyUsage digitalSignature`` and
    ``extendedKeyUsage serverAuth``; the CA has ``CA:TRUE, pathlen:0`` and
    ``keyCertSign``. Both are valid from five minutes ago (clock skew) for
    ``days`` days.

    Returns:
        ``{"ca_cert": ca.crt, "ca_key": ca.key, "server_cert": server.crt,
        "server_key": server.key}``. Give ``ca.crt`` to the SuperNodes
        (``--root-certificates``); keep ``ca.key`` offline.

    Raises:
        FileExistsError: if any of the four files exists and ``force`` is false.
        ValueError: if ``hosts`` is empty or ``days`` is not positive.
    """
    if isinstance(hosts, str):
        hosts = (hosts,)
    sans = _san_entries(hosts)
    if days <= 0:
        raise ValueError(f"days must be a positive number of days, got {days}.")
    ca_cert_path, ca_key_path, server_cert_path, server_key_path = prepare_targets(
        out_dir, ("ca.crt", "ca.key", "server.crt", "server.key"), force=force
    )

    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _build_ca(ca_key, not_before=not_before, not_after=not_after)
    server_key = ec.generate_private_key(ec.SECP256R1())
    first = sans[0]
    common_name = str(first.value)
    server_cert = _build_server_cert(
        server_key,
        ca_cert=ca_cert,
        ca_key=ca_key,
        sans=sans,
        common_name=common_name,
        not_before=not_before,
        not_after=not_after,
    )

    write_private_key(ca_key_path, private_bytes(ca_key))
    write_private_key(server_key_path, private_bytes(server_key))
    write_public_file(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_public_file(server_cert_path, server_cert.public_bytes(serialization.Encoding.PEM))
    return {
        "ca_cert": ca_cert_path,
        "ca_key": ca_key_path,
        "server_cert": server_cert_path,
        "server_key": server_key_path,
    }

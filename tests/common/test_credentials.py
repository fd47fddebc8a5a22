"""Tests for fedlora.common.credentials and fedlora.common.tls: key files, Flower node-key format, TLS certificates."""

from __future__ import annotations

import ipaddress
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store

from fedlora.common.credentials import (
    load_private_key,
    load_public_key,
    write_node_keypair,
    write_signing_keypair,
)
from fedlora.common.tls import write_tls_certificates


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One CA + server certificate for 127.0.0.1, localhost and an extra name."""
    out_dir = tmp_path_factory.mktemp("tls")
    return write_tls_certificates(
        out_dir, hosts=("127.0.0.1", "localhost", "superlink.example", "::1")
    )


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --------------------------------------------------------------------------- #
# File handling
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "make_private_keys",
    [
        lambda d: [write_signing_keypair(d)[0]],
        lambda d: [write_node_keypair(d, "node-1")[0]],
        lambda d: [(paths := write_tls_certificates(d))["ca_key"], paths["server_key"]],
    ],
    ids=["signing", "node", "tls"],
)
def test_private_keys_are_created_mode_0600(tmp_path: Path, make_private_keys) -> None:
    # Prepare / Execute
    private_paths = make_private_keys(tmp_path)

    # Assert
    assert [_mode(path) for path in private_paths] == [0o600] * len(private_paths)


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    # Prepare
    private_path, public_path = write_signing_keypair(tmp_path)
    before = (private_path.read_bytes(), public_path.read_bytes())

    # Execute
    with pytest.raises(FileExistsError) as excinfo:
        write_signing_keypair(tmp_path)

    # Assert
    assert str(private_path) in str(excinfo.value) and "--force" in str(excinfo.value)
    assert (private_path.read_bytes(), public_path.read_bytes()) == before


def test_force_replaces_keys_and_restores_mode_0600(tmp_path: Path) -> None:
    # Prepare
    private_path, _ = write_node_keypair(tmp_path, "node-1")
    old = private_path.read_bytes()
    private_path.chmod(0o644)

    # Execute
    write_node_keypair(tmp_path, "node-1", force=True)

    # Assert
    assert private_path.read_bytes() != old
    assert _mode(private_path) == 0o600


def test_signing_keypair_round_trips_through_loaders(tmp_path: Path) -> None:
    # Prepare
    private_path, public_path = write_signing_keypair(tmp_path, name="registry")

    # Execute
    signature = load_private_key(private_path).sign(b"payload")

    # Assert (verify raises InvalidSignature on mismatch)
    load_public_key(public_path).verify(signature, b"payload")
    assert isinstance(load_public_key(public_path), ed25519.Ed25519PublicKey)


def test_loading_a_node_key_as_signing_key_names_the_file(tmp_path: Path) -> None:
    # Prepare
    private_path, _ = write_node_keypair(tmp_path, "node-1")

    # Execute / Assert
    with pytest.raises(ValueError, match=str(private_path)):
        load_private_key(private_path)


# --------------------------------------------------------------------------- #
# Flower SuperNode authentication keys
# --------------------------------------------------------------------------- #
def test_node_public_key_loads_like_flwr_supernode_register(tmp_path: Path) -> None:
    # Prepare
    from flwr.cli.supernode.register import try_load_public_key

    _, public_path = write_node_keypair(tmp_path, "node-1")

    # Execute: the same call `flwr supernode register` makes, then Flower's own loader
    public_key = serialization.load_ssh_public_key(public_path.read_bytes())
    flower_bytes = try_load_public_key(public_path)

    # Assert
    assert public_path.name == "node-1.pub"
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP384R1)
    assert serialization.load_pem_public_key(flower_bytes).public_numbers() == public_key.public_numbers()


def test_node_private_key_loads_like_flower_supernode_and_matches_pub(tmp_path: Path) -> None:
    # Prepare
    private_path, public_path = write_node_keypair(tmp_path, "node-1")

    # Execute: the same call `flower-supernode --auth-supernode-private-key` makes
    private_key = serialization.load_ssh_private_key(private_path.read_bytes(), None)

    # Assert
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    published = serialization.load_ssh_public_key(public_path.read_bytes())
    assert private_key.public_key().public_numbers() == published.public_numbers()


# --------------------------------------------------------------------------- #
# TLS certificates
# --------------------------------------------------------------------------- #
def test_server_certificate_is_signed_by_ca(tls: dict[str, Path]) -> None:
    # Prepare
    ca_cert, server_cert = _load_cert(tls["ca_cert"]), _load_cert(tls["server_cert"])

    # Execute / Assert (raises InvalidSignature or ValueError if not)
    server_cert.verify_directly_issued_by(ca_cert)


def test_server_certificate_carries_every_host_as_san(tls: dict[str, Path]) -> None:
    # Prepare
    server_cert = _load_cert(tls["server_cert"])

    # Execute
    san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    # Assert
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example"}


def test_server_certificate_passes_webpki_server_verification(tls: dict[str, Path]) -> None:
    # Prepare: strict RFC 5280 / CA-B Forum checks (basicConstraints, keyUsage, EKU, SAN)
    ca_cert, server_cert = _load_cert(tls["ca_cert"]), _load_cert(tls["server_cert"])
    verifier = (
        PolicyBuilder()
        .store(Store([ca_cert]))
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )

    # Execute
    chain = verifier.verify(server_cert, [])

    # Assert
    assert chain[-1] == ca_cert


def test_grpc_accepts_the_key_and_certificates(tls: dict[str, Path]) -> None:
    # Prepare
    key, cert, ca = (tls[k].read_bytes() for k in ("server_key", "server_cert", "ca_cert"))

    # Execute / Assert: the same calls Flower makes (flwr/supercore/grpc.py)
    grpc.ssl_server_credentials(((key, cert),), root_certificates=ca, require_client_auth=False)
    grpc.ssl_channel_credentials(root_certificates=ca)


def _echo_server(tls: dict[str, Path]) -> tuple[grpc.Server, int]:
    """A tiny TLS gRPC server with one unary method ``/t.Echo/Ping`` echoing bytes."""
    handler = grpc.method_handlers_generic_handler(
        "t.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(lambda request, _ctx: request)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), handlers=(handler,))
    credentials = grpc.ssl_server_credentials(
        ((tls["server_key"].read_bytes(), tls["server_cert"].read_bytes()),)
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def _ping(port: int, root_certificates: bytes) -> bytes:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return channel.unary_unary("/t.Echo/Ping")(b"hello", timeout=2)


def test_tls_handshake_succeeds_with_the_ca(tls: dict[str, Path]) -> None:
    # Prepare
    server, port = _echo_server(tls)
    try:
        # Execute
        reply = _ping(port, tls["ca_cert"].read_bytes())
    finally:
        server.stop(None)

    # Assert
    assert reply == b"hello"


def test_tls_handshake_fails_with_another_ca(tls: dict[str, Path], tmp_path: Path) -> None:
    # Prepare
    other_ca = write_tls_certificates(tmp_path)["ca_cert"].read_bytes()
    server, port = _echo_server(tls)
    try:
        # Execute / Assert
        with pytest.raises(grpc.RpcError) as excinfo:
            _ping(port, other_ca)
    finally:
        server.stop(None)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE

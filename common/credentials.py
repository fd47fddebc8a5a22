"""Key generation for fedlora, and the careful key-file writing :mod:`fedlora.common.tls` shares.

Two kinds of key pairs are produced here (TLS certificates: :mod:`fedlora.common.tls`), all with the ``cryptography``
package and all written without ever overwriting an existing file unless the
caller passes ``force=True`` (the CLI's ``--force``):

* an Ed25519 *signing* key pair, used to sign published model versions
  (PEM: PKCS8 private key, SubjectPublicKeyInfo public key);
* an ECDSA P-384 *SuperNode authentication* key pair in the OpenSSH formats
  that Flower 1.42 loads (``flwr supernode register <name>.pub`` and
  ``flower-supernode --auth-supernode-private-key <name>``).

Private keys are created with ``os.open(..., 0o600)`` so that they are never
readable by other users, not even for an instant.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
NEW_DIR_MODE = 0o700

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------- #
# Low-level file writing
# --------------------------------------------------------------------------- #
def _check_name(name: str) -> str:
    """Return ``name`` if it is a safe file name, else raise ``ValueError``."""
    if not _SAFE_NAME.match(name) or name.endswith((".pub", ".key")):
        raise ValueError(
            f"Invalid key name {name!r}: use letters, digits, '.', '_' or '-' "
            "(no path separators, not starting with '.' and without a "
            "'.pub'/'.key' suffix, which is added automatically)."
        )
    return name


def prepare_targets(out_dir: Path | str, names: Iterable[str], *, force: bool) -> list[Path]:
    """Create ``out_dir`` (mode 0700 if new) and refuse existing targets unless ``force``.

    All targets are checked before anything is written, so a refused call
    leaves the directory exactly as it was.
    """
    directory = Path(out_dir).expanduser()
    directory.mkdir(mode=NEW_DIR_MODE, parents=True, exist_ok=True)
    targets = [directory / name for name in names]
    if not force:
        existing = [str(path) for path in targets if os.path.lexists(path)]
        if existing:
            raise FileExistsError(
                f"Refusing to overwrite existing file(s): {', '.join(existing)}. "
                "Pass --force (force=True) to replace them, or choose another "
                "output directory."
            )
    return targets


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a fresh file created with ``mode``.

    An existing file (or symlink) at ``path`` is unlinked first; the caller has
    already decided that overwriting is allowed. ``O_EXCL`` plus ``O_NOFOLLOW``
    guarantee we create a new inode rather than writing through a planted
    symlink, and ``fchmod`` makes the mode exact regardless of the umask.
    """
    if os.path.lexists(path):
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            fd = -1  # now owned by the file object
            handle.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def write_private_key(path: Path, data: bytes) -> None:
    _write_file(path, data, mode=PRIVATE_KEY_MODE)


def write_public_file(path: Path, data: bytes) -> None:
    _write_file(path, data, mode=PUBLIC_FILE_MODE)


# --------------------------------------------------------------------------- #
# Ed25519 signing keys (publishing registry)
# --------------------------------------------------------------------------- #
def private_bytes(key, private_format=serialization.PrivateFormat.PKCS8) -> bytes:
    """A private key as unencrypted PEM (PKCS8 unless told otherwise); its file is mode 0600."""
    return key.private_bytes(encoding=serialization.Encoding.PEM, format=private_format,
                             encryption_algorithm=serialization.NoEncryption())


def write_signing_keypair(
    out_dir: Path | str, *, name: str = "fedlora-signing", force: bool = False
) -> tuple[Path, Path]:
    """Generate an Ed25519 key pair for signing published versions.

    Writes ``<name>.key`` (PKCS8 PEM, unencrypted, mode 0600) and
    ``<name>.pub`` (SubjectPublicKeyInfo PEM) into ``out_dir``.

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        FileExistsError: if either file exists and ``force`` is false.
        ValueError: if ``name`` is not a plain file name.
    """
    _check_name(name)
    private_path, public_path = prepare_targets(
        out_dir, (f"{name}.key", f"{name}.pub"), force=force
    )
    private_key = ed25519.Ed25519PrivateKey.generate()
    private_pem = private_bytes(private_key)
    public_pem = private_key.public_key().public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    write_private_key(private_path, private_pem)
    write_public_file(public_path, public_pem)
    return private_path, public_path


def load_private_key(path: Path | str) -> ed25519.Ed25519PrivateKey:
    """Load an Ed25519 signing private key (PKCS8 PEM) written by :func:`write_signing_keypair`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not an unencrypted Ed25519 PEM private key.
    """
    key_path = Path(path).expanduser()
    if not key_path.is_file():
        raise FileNotFoundError(
            f"Signing private key {key_path} does not exist; create one with "
            "write_signing_keypair (the CLI's key generation command)."
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{key_path}: not an unencrypted PEM private key ({err})."
        ) from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(
            f"{key_path}: expected an Ed25519 signing key, got {type(key).__name__}. "
            "Use the '.key' file written by write_signing_keypair."
        )
    return key


def load_public_key(path: Path | str) -> ed25519.Ed25519PublicKey:
    """Load an Ed25519 signing public key (PEM) written by :func:`write_signing_keypair`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not an Ed25519 PEM public key.
    """
    key_path = Path(path).expanduser()
    if not key_path.is_file():
        raise FileNotFoundError(
            f"Signing public key {key_path} does not exist; pass the '.pub' file "
            "written next to the signing private key."
        )
    try:
        key = serialization.load_pem_public_key(key_path.read_bytes())
    except ValueError as err:
        raise ValueError(f"{key_path}: not a PEM public key ({err}).") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(
            f"{key_path}: expected an Ed25519 public key, got {type(key).__name__}. "
            "Use the '.pub' file written by write_signing_keypair."
        )
    return key


# --------------------------------------------------------------------------- #
# SuperNode authentication keys (Flower node auth)
# --------------------------------------------------------------------------- #
def write_node_keypair(
    out_dir: Path | str, name: str, *, force: bool = False
) -> tuple[Path, Path]:
    """Generate a SuperNode authentication key pair in Flower's format.

    Flower 1.42 loads the private key with
    ``serialization.load_ssh_private_key(data, None)`` and requires an
    ``EllipticCurvePrivateKey`` (``flwr/supernode/cli/flower_supernode.py``);
    ``flwr supernode register`` loads the public key with
    ``serialization.load_ssh_public_key`` and requires a NIST curve
    (``flwr/cli/supernode/register.py``). We use ECDSA P-384 (SECP384R1), the
    curve Flower itself generates.

    Writes ``<name>`` (OpenSSH private key, unencrypted, mode 0600) and
    ``<name>.pub`` (one ``ecdsa-sha2-nistp384 ...`` line) into ``out_dir``. Returns
    and raises as :func:`write_signing_keypair`.
    """
    _check_name(name)
    private_path, public_path = prepare_targets(out_dir, (name, f"{name}.pub"), force=force)
    private_key = ec.generate_private_key(ec.SECP384R1())
    private_ssh = private_bytes(private_key, serialization.PrivateFormat.OpenSSH)
    public_ssh = private_key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH,
        format=serialization.PublicFormat.OpenSSH,
    )
    write_private_key(private_path, private_ssh)
    write_public_file(public_path, public_ssh + f" {name}\n".encode())
    return private_path, public_path

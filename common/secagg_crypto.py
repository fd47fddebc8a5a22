"""Key agreement, authenticated encryption and Shamir sharing for secure aggregation.

Thin wrappers over Flower's vetted primitives (``flwr.common.secure_aggregation``):
ECDH on P-384 + HKDF-SHA256 (``generate_shared_key``), Fernet authenticated encryption
(``encrypt``/``decrypt``), Shamir t-of-n sharing over GF(2^128) (``create_shares``/
``combine_shares``) and the share plaintext layout (``share_keys_plaintext_*``). What
Flower gets wrong for this project — the 32-bit folding of mask seeds — is not used:
seeds here are the full 32 HKDF bytes, expanded by :func:`fedlora.common.secagg.prg_mask`.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedlora.common.secagg import SEED_BYTES

CURVE = ec.SECP384R1()
_SK_BYTES = 48


class ShareError(ValueError):
    """A share that cannot be decrypted or is addressed to someone else."""


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def new_seed() -> bytes:
    """A fresh self-mask seed: 32 bytes from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


def seed_commitment(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed (domain-separated): sent in setup, so the server can check a
    seed rebuilt from shares (one combination, and a wrong share is provably wrong); the seed's
    256 bits of entropy keep it hidden."""
    import hashlib

    return hashlib.sha256(b"fedlora-secagg-seed/1|" + seed).digest()


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, data)


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(_SK_BYTES, "big")


def load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(data, "big"), CURVE)


def agree(private: ec.EllipticCurvePrivateKey, public: bytes) -> bytes:
    """The Fernet key (urlsafe base64 of 32 HKDF bytes) two nodes share."""
    return generate_shared_key(private, load_public(public))


def mask_seed(private: ec.EllipticCurvePrivateKey, public: bytes) -> bytes:
    """The full 32-byte pairwise mask seed two nodes share."""
    return base64.urlsafe_b64decode(agree(private, public))


def split(secret: bytes, *, threshold: int, holders: int) -> list[bytes]:
    """``holders`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it."""
    return create_shares(secret, threshold, holders)


def combine(shares: list[bytes]) -> bytes:
    return combine_shares(shares)


def seal_shares(key: bytes, *, src: int, dst: int, b_share: bytes, sk_share: bytes) -> bytes:
    """Encrypt ``src``'s two shares for ``dst``; the ids inside bind the ciphertext to the pair."""
    return encrypt(key, share_keys_plaintext_concat(src, dst, b_share, sk_share))


def open_shares(key: bytes, ciphertext: bytes, *, src: int, dst: int) -> tuple[bytes, bytes]:
    """Decrypt shares sent by ``src`` to ``dst``; raise :class:`ShareError` on any mismatch."""
    from cryptography.fernet import InvalidToken

    try:
        plain = decrypt(key, ciphertext)
    except InvalidToken:
        raise ShareError(f"shares from node {src} failed authentication") from None
    got_src, got_dst, b_share, sk_share = share_keys_plaintext_separate(plain)
    if (got_src, got_dst) != (src, dst):
        raise ShareError(f"shares claim {got_src}->{got_dst} but were delivered as {src}->{dst}")
    return b_share, sk_share

"""Authenticated SecAgg+ keys: each tenant signs its round's public keys with its node identity
key, and each tenant checks its neighbours' against a roster it holds.

Without this a server that follows the protocol learns only the sum, but one that does not can
hand a tenant its own public keys in place of the neighbours' (it then opens that tenant's
Shamir shares, rebuilds its masks and unmasks its update). With it (Bell et al. 2020, malicious
server: keys signed under a PKI):

* the **identity key** is the node's SuperNode authentication key (ECDSA P-384, the OpenSSH
  file ``fedlora deploy supernode --key`` gives Flower), so no new secret is needed;
* the **roster** is the federation's admitted nodes, ``{"<node id>": "<ecdsa-sha2-nistp384 ...>"}``
  (``fedlora deploy roster`` writes it from the operator's registrations), handed to each tenant
  out of band (``fedlora deploy supernode --roster FILE``): the server cannot add a key to it;
* a tenant signs :func:`statement` (round, attempt, its node id and both public keys) in setup,
  and refuses key sharing when a neighbour is not on its roster or its keys do not carry its
  signature. No share leaves the tenant before that check;
* after the masked upload each survivor signs :func:`survivors_statement`, the set of nodes the
  server says uploaded (the consistency round). A tenant with a roster reveals unmask shares only
  for that set, and only when at least its threshold of share holders signed the very same set:
  a server that tells one tenant a node dropped (to get its mask key) and another that it
  survived (to get its self-mask seed) cannot gather both for one node, as two signed views
  would need an honest holder to sign twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DOMAIN = b"fedlora-secagg-keys/1"
SURVIVORS_DOMAIN = b"fedlora-secagg-survivors/1"


class RosterError(ValueError):
    """A roster file that cannot be read, with the file and what to do."""


def statement(server_round: int, attempt: int, node: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """The bytes a tenant signs: its two public keys for one attempt of one round."""
    return b"|".join([DOMAIN, str(int(server_round)).encode(), str(int(attempt)).encode(), str(int(node)).encode(),
                      c_pk.hex().encode(), s_pk.hex().encode()])


def survivors_statement(server_round: int, attempt: int, survivors: list[int]) -> bytes:
    """The bytes each survivor signs in the consistency round: the set of nodes that uploaded."""
    return b"|".join([SURVIVORS_DOMAIN, str(int(server_round)).encode(), str(int(attempt)).encode(),
                      ",".join(str(int(n)) for n in sorted(survivors)).encode()])


def load_identity_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """The node's SuperNode authentication key (OpenSSH or PEM, ECDSA)."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except ValueError:
        key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: the node identity key must be an ECDSA key (the SuperNode's --key)")
    return key


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def _public_key(text: str, *, where: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, AttributeError, UnsupportedAlgorithm) as err:
        raise RosterError(f"{where}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise RosterError(f"{where}: not an ECDSA public key")
    return key


def load_roster(path: str | Path) -> dict[int, ec.EllipticCurvePublicKey]:
    """``{node id: public key}`` from a roster file; raises :class:`RosterError` naming the entry."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RosterError(f"roster {path}: {err.strerror or err}; get it from the federation's operator "
                          "(`fedlora deploy roster --out FILE`)") from None
    except ValueError as err:
        raise RosterError(f"roster {path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not doc:
        raise RosterError(f"roster {path}: expected an object {{\"<node id>\": \"<public key line>\"}}")
    out = {}
    for node, key in doc.items():
        if not str(node).isdigit() or not isinstance(key, str):
            raise RosterError(f"roster {path}: entry {node!r} is not a node id with a public key line")
        out[int(node)] = _public_key(key, where=f"roster {path}, node {node}")
    return out


def check_signature(roster: dict[int, ec.EllipticCurvePublicKey], node: int, signature: bytes, *,
                    server_round: int, attempt: int, c_pk: bytes, s_pk: bytes) -> str | None:
    """None if ``node``'s keys carry its rostered signature, else why not (a refusal reason)."""
    return _verify(roster, node, signature, statement(server_round, attempt, node, c_pk, s_pk),
                   what="keys", forged="substituted or forged", plural=True)


def check_survivors(roster: dict[int, ec.EllipticCurvePublicKey], node: int, signature: bytes, *,
                    server_round: int, attempt: int, survivors: list[int]) -> str | None:
    """None if ``node`` signed exactly this survivor set, else why not (a refusal reason)."""
    return _verify(roster, node, signature, survivors_statement(server_round, attempt, survivors),
                   what="survivor set", forged="it signed a different set, or the signature is forged")


def _verify(roster: dict[int, ec.EllipticCurvePublicKey], node: int, signature: bytes, message: bytes, *,
            what: str, forged: str, plural: bool = False) -> str | None:
    key = roster.get(node)
    if key is None:
        return f"node {node} is not on this tenant's roster"
    if not signature:
        return f"node {node}'s {what} {'carry' if plural else 'carries'} no signature"
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return f"node {node}'s {what} {'are' if plural else 'is'} not signed by its rostered identity key ({forged})"
    return None

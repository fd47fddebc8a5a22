"""Identifiable abort for SecAgg+'s unmasking: rebuild a secret from the shares that agree, and
name the holder whose share does not.

A node's self-mask seed or mask key is Shamir-shared among its neighbours; any ``threshold``
shares rebuild it. A corrupted share rebuilds a wrong secret (or none), and taking the first
``threshold`` shares let one bad share abort every secure round without saying whose it was.
:func:`recover` tries threshold-sized subsets of the shares the server holds:

* a *mask key* is checked against the public key the node announced in setup, and a *self-mask
  seed* against the commitment it sent there (``secagg_crypto.seed_commitment``), so any subset
  that rebuilds it proves its holders honest;
* without a check (the fallback for a node whose own commitment matches no rebuild) a value wins
  only when it is consistent with at least (holders + threshold) / 2 shares, the most wrong shares
  that still leave one answer (Reed-Solomon's unique decoding radius); with fewer the shares
  cannot tell which is right: :class:`Unrecoverable`. (Exactly ``threshold`` shares give one
  answer and no second opinion.)

Holders that appear in no subset rebuilding the winner are the culprits. The number of subsets
tried is capped (:data:`MAX_SUBSETS`); leave-one-out subsets come first, which find a single
bad share among any number of holders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import combinations, islice

from fedlora.common import secagg_crypto as crypto

MAX_SUBSETS = 64


class Unrecoverable(ValueError):
    """No subset of the shares rebuilds the secret (with the holders that are known bad)."""

    def __init__(self, message: str, culprits: list[int]) -> None:
        super().__init__(message)
        self.culprits = culprits


def _subsets(holders: list[int], threshold: int):
    """Threshold-sized subsets: leave-one-out windows over the holders first, then the rest."""
    seen = set()
    k = len(holders)
    for skip in range(k):  # consecutive windows that each leave out a different holder
        window = tuple(sorted(holders[(skip + 1 + i) % k] for i in range(threshold))) if threshold < k else None
        if window and window not in seen:
            seen.add(window)
            yield window
    for combo in combinations(holders, threshold):
        if combo not in seen:
            seen.add(combo)
            yield combo


def _combine(shares: Mapping[int, bytes], subset) -> bytes | None:
    try:
        return crypto.combine([shares[h] for h in subset])
    except Exception:  # noqa: BLE001 - a malformed share: this subset rebuilds nothing
        return None


def recover(shares: Mapping[int, bytes], threshold: int, *, check: Callable[[bytes], bool] | None = None,
            what: str = "the secret") -> tuple[bytes, list[int]]:
    """(the secret, the holders whose shares are inconsistent with it) from ``shares`` (holder ->
    share). ``check(secret)`` says whether a candidate is right (a mask key against its public
    key); without it a candidate that enough shares agree on wins. Raises :class:`Unrecoverable`."""
    holders = sorted(shares)
    if len(holders) < threshold:
        raise Unrecoverable(f"{what}: {len(holders)} share(s), fewer than the threshold {threshold}", [])
    # the honest case costs two combinations that agree (the first and the last threshold shares,
    # which together cover every holder: a wrong share among them rebuilds a different value from
    # each), or one when there are only threshold shares (then only a check can prove it)
    first = _combine(shares, holders[:threshold])
    if first is not None and (check is None or check(first)) and (
            len(holders) == threshold or _combine(shares, holders[-threshold:]) == first):
        return first, []
    support: dict[bytes, set[int]] = {}
    for subset in islice(_subsets(holders, threshold), MAX_SUBSETS):
        secret = _combine(shares, subset)
        if secret is None or (check is not None and not check(secret)):
            continue
        if check is not None:  # provably right: its holders are honest
            good = set(subset)
            for other in islice(_subsets(holders, threshold), MAX_SUBSETS):
                if _combine(shares, other) == secret:
                    good |= set(other)
            return secret, sorted(set(holders) - good)
        support.setdefault(secret, set()).update(subset)
    if check is not None or not support:
        raise Unrecoverable(f"{what}: no {threshold} of the {len(holders)} shares rebuild it", [])
    # unchecked, a value is certain only when it is consistent with at least (holders + threshold) / 2
    # shares: then no other value can be (two such would share threshold shares, so be the same);
    # with more wrong shares than that leaves, which one is right cannot be told from the shares
    best = max(support, key=lambda value: len(support[value]))
    if 2 * len(support[best]) < len(holders) + threshold:
        raise Unrecoverable(f"{what}: the shares disagree and no value is consistent with enough of them "
                            f"({len(support[best])} of {len(holders)} shares, threshold {threshold}: "
                            f"{-(-(len(holders) + threshold) // 2)} needed)", [])
    return best, sorted(set(holders) - support[best])

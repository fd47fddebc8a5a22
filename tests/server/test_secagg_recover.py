"""Identifiable abort: a secret rebuilt from the shares that agree, and the holders of the others named."""

from __future__ import annotations

import os

import pytest

from fedlora.common import secagg_crypto as crypto
from fedlora.server.secagg_recover import Unrecoverable, recover

HOLDERS = [10, 11, 12, 13, 14]


def _shares(secret: bytes, threshold: int = 3) -> dict[int, bytes]:
    return dict(zip(HOLDERS, crypto.split(secret, threshold=threshold, holders=len(HOLDERS))))


def _corrupt(shares: dict[int, bytes], holder: int) -> None:
    """A well-formed share of the right index, of a secret of its own (what a lying holder sends)."""
    shares[holder] = dict(zip(HOLDERS, crypto.split(os.urandom(32), threshold=3, holders=len(HOLDERS))))[holder]


def test_honest_shares_rebuild_the_secret_and_name_no_one():
    secret = os.urandom(32)
    assert recover(_shares(secret), 3) == (secret, [])


@pytest.mark.parametrize("holder", HOLDERS)
def test_one_corrupted_share_of_five_is_named_without_a_check(holder):
    # Prepare: five shares, threshold 3, one corrupted: the secret agrees with 4 shares, (5 + 3) / 2
    secret = os.urandom(32)
    shares = _shares(secret)
    _corrupt(shares, holder)
    # Execute / Assert
    assert recover(shares, 3) == (secret, [holder])


@pytest.mark.parametrize("bad", [[12, 13], [10, 14]])
def test_two_corrupted_shares_of_five_are_named_with_a_check_and_refused_without(bad):
    # Prepare: five shares, threshold 3, two corrupted: the three honest shares rebuild the secret,
    # but so do other triples rebuild values of their own, each agreeing with 3 shares < (5 + 3) / 2
    secret = os.urandom(32)
    shares = _shares(secret)
    for h in bad:
        _corrupt(shares, h)
    # Execute / Assert: the commitment tells which is right; without it nothing can
    assert recover(shares, 3, check=lambda s: crypto.seed_commitment(s) == crypto.seed_commitment(secret)) \
        == (secret, bad)
    with pytest.raises(Unrecoverable, match="3 of 5 shares, threshold 3: 4 needed"):
        recover(shares, 3)


def test_a_mask_key_is_checked_against_its_public_key():
    # Prepare: a mask key shared five ways, one share corrupted
    key = crypto.new_private_key()
    secret, public = crypto.private_bytes(key), crypto.public_bytes(key)
    shares = _shares(secret)
    _corrupt(shares, 11)
    # Execute
    got, bad = recover(shares, 3, check=lambda s: crypto.public_bytes(crypto.load_private(s)) == public)
    # Assert
    assert got == secret and bad == [11]


def test_too_few_consistent_shares_fail_loudly():
    secret = os.urandom(32)
    shares = _shares(secret)
    for h in (10, 11, 12):
        _corrupt(shares, h)
    with pytest.raises(Unrecoverable, match="no .*rebuild|disagree"):
        recover(shares, 3, what="node 7's self-mask seed")
    with pytest.raises(Unrecoverable, match="fewer than the threshold 3"):
        recover({10: shares[13], 11: shares[14]}, 3)


def test_a_seed_checked_against_its_commitment_names_a_liar_among_exactly_threshold_shares():
    # Prepare: a self-mask seed with 3 shares, threshold 3, one share corrupted; without its
    # commitment there is no second opinion, with it the corruption is provable
    secret = b"\x05" * 32
    shares = _shares(secret)
    three = {h: shares[h] for h in HOLDERS[:3]}
    _corrupt(three, 11)
    commitment = crypto.seed_commitment(secret)
    # Execute / Assert: the check refuses the wrong value; too few shares remain to rebuild it
    with pytest.raises(Unrecoverable, match="no 3 of the 3 shares rebuild it"):
        recover(three, 3, check=lambda s: crypto.seed_commitment(s) == commitment)
    # ...and with one more honest share the liar is named and the seed rebuilt
    four = {**three, 13: shares[13]}
    got, bad = recover(four, 3, check=lambda s: crypto.seed_commitment(s) == commitment)
    assert (got, bad) == (secret, [11])

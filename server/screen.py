"""The direction screen: an update that points away from the round's consensus is dropped.

A norm bound stops an attacker that sends too much, not one that sends the wrong thing at an
ordinary size: an update sign-flipped at the median norm passes every norm bound and pulls the
mean back by as much as an honest tenant pushes it. So, on the plain transport, the server
compares each update with the round's coordinate-wise median update (which fewer than half
of the tenants cannot move far) and, with ``federation.outlier-action = drop`` (the default),
drops an update whose cosine to it is below ``federation.outlier-cosine`` (0: any update that
points away) or below ``federation.outlier-cosine-ratio`` x the round's median cosine (one
that agrees with the consensus much less than the others do). With ``flag`` the audit only
reports it. Three updates or more are needed; with fewer there is no consensus to compare.

The median and the cosines are taken on ``federation.audit-coordinates`` coordinates drawn per
round (in runs of 64 neighbours) with a key the server draws from OS randomness at the start of
the run and keeps in its resume state: cheap (the median of K x M values, not of K x N), and an
attacker who cannot know the sample cannot hide its update in the coordinates left out. 0 takes
every coordinate.

Under central DP the screen only flags (``ServerPrivacy.bounds``): which updates it drops
depends on the other tenants' updates, so adding one tenant could drop or re-admit another
and move the sum by more than the accountant's clip.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from fedlora.server.aggregation import Update, coordinate_median

ACTIONS = ("drop", "flag")
BLOCK = 64  # sampled coordinates come in runs of this many neighbours


@dataclass
class Sample:
    """The round's sampled view: each update's sampled coordinates and their median."""

    vectors: dict[int, np.ndarray]      # node -> its sampled coordinates (float64)
    reference: np.ndarray | None        # their coordinate-wise median (None: fewer than three)
    coordinates: int                    # how many were sampled (= all when the sample is off or larger)
    total: int                          # how many the updates have
    cosines: dict[int, float] = field(default_factory=dict)  # node -> cosine to the reference
    index: np.ndarray | None = None     # the sampled flat indices (None: every coordinate)

    def cosine_to(self, delta) -> dict[int, float]:
        """Each update's cosine to ``delta`` (adapter-shaped: the round's sum or mean, the cosine is
        the same) on the same coordinates."""
        if delta is None or not self.vectors:
            return {n: 0.0 for n in self.vectors}
        target = _gather(delta, self.index)
        return {n: cosine(v, target) for n, v in self.vectors.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def _index(delta, count: int, key: bytes, server_round: int):
    """(sorted flat indices, or None for all) and the total number of coordinates."""
    total = sum(int(v.size) for v in delta.values())
    if not count or count >= total:
        return None, total
    seed = int.from_bytes(hashlib.sha256(key + server_round.to_bytes(8, "big")).digest()[:8], "big")
    # runs of BLOCK neighbours at random places: the same coordinates' worth of reading as single
    # ones, in a fraction of the cache misses
    block = min(BLOCK, count)
    starts = np.sort(np.random.default_rng(seed).integers(0, total - block + 1, size=max(1, count // block)))
    return np.sort((starts[:, None] + np.arange(block)).ravel()), total  # runs may overlap: sorted again


def _gather(delta, index) -> np.ndarray:
    """The coordinates ``index`` (flat, over the tensors in order) of ``delta``, as float64,
    without concatenating the tensors (only the sampled elements are read)."""
    if index is None:
        return np.concatenate([v.ravel() for v in delta.values()]).astype(np.float64)
    out, start, lo = [], 0, 0
    for v in delta.values():
        end = start + int(v.size)
        hi = int(np.searchsorted(index, end, side="left"))
        if hi > lo:
            out.append(v.reshape(-1)[index[lo:hi] - start].astype(np.float64))
        start, lo = end, hi
    return np.concatenate(out) if out else np.zeros(0)


def sample(updates: list[Update], *, coordinates: int, key: bytes, server_round: int) -> Sample:
    """The sampled view of ``updates`` (all of one shape: ``LoraRule.comparable``)."""
    if not updates:
        return Sample({}, None, 0, 0)
    index, total = _index(updates[0].delta, coordinates, key, server_round)
    vectors = {u.node: _gather(u.delta, index) for u in updates}
    reference = coordinate_median(np.stack(list(vectors.values()))) if len(vectors) > 2 else None
    s = Sample(vectors, reference, total if index is None else int(index.size), total, index=index)
    s.cosines = {n: cosine(v, reference) if reference is not None else 1.0 for n, v in vectors.items()}
    return s


@dataclass(frozen=True)
class DirectionScreen:
    """Which updates point away from the round's consensus, and whether they are dropped."""

    min_cosine: float = 0.0
    ratio: float = 0.5
    action: str = "drop"
    coordinates: int = 65536

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"outlier action {self.action!r}: choose one of {', '.join(ACTIONS)}")

    @classmethod
    def from_config(cls, fed) -> "DirectionScreen":
        return cls(min_cosine=fed.outlier_cosine, ratio=fed.outlier_cosine_ratio, action=fed.outlier_action,
                   coordinates=fed.audit_coordinates)

    def flag_only(self) -> "DirectionScreen":
        return DirectionScreen(self.min_cosine, self.ratio, "flag", self.coordinates)

    def describe(self) -> str:
        rule = f"cosine to the round's median update < {self.min_cosine:g}"
        if self.ratio:
            rule += f" or < {self.ratio:g} x the round's median cosine"
        return f"{rule}: {'dropped' if self.action == 'drop' else 'flagged'}"

    def outliers(self, s: Sample) -> dict[int, str]:
        """node -> why its direction disagrees with the consensus (empty with fewer than three)."""
        if s.reference is None:
            return {}
        typical = statistics.median(s.cosines.values())
        out = {}
        for node, c in s.cosines.items():
            if c < self.min_cosine:
                out[node] = f"cosine {c:.2f} to the round's median update is below {self.min_cosine:g}"
            elif self.ratio and typical > 0 and c < self.ratio * typical:
                out[node] = (f"cosine {c:.2f} to the round's median update is below {self.ratio:g} x the round's "
                             f"median cosine {typical:.2f}")
        return out

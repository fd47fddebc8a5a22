"""A run config and a message, checked against a tenant policy (plain functions; no Flower).

:func:`run_problems` lists every way a run's config breaks the policy, as (code, public
message) pairs; :func:`message_problems` adds what only the message shows (a plain training
message where secure aggregation is required, a secure round with too few neighbours, an
evaluation over the run's budget). :func:`check` raises one
:class:`fedlora.client.policy.PolicyDeclined` listing them all.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fedlora.client.policy import PolicyDeclined, TenantPolicy
from fedlora.common.config import Config

Problem = tuple[str, str]


def run_problems(policy: TenantPolicy, cfg: Config, *, num_records: int) -> list[Problem]:
    """What in ``cfg`` the policy does not accept, for a tenant of ``num_records`` training records."""
    out: list[Problem] = []
    pr, c = policy.privacy, policy.compute
    mode = cfg.privacy.mode
    if (pr.mode == "local" and mode != "local") or (pr.mode == "local-or-central" and mode == "none"):
        want = "local DP" if pr.mode == "local" else "local or central DP"
        out.append(("privacy-mode", f"privacy.mode {mode!r}: the tenant requires {want}"))
    if mode == "local":
        out += _local_dp_problems(policy, cfg, num_records=num_records)
    batch = min(cfg.train.batch_size, max(num_records, 1))
    if batch < pr.min_batch_size:
        out.append(("batch-size", f"batch size {batch} below the tenant's {pr.min_batch_size}"))
    for code, key, value, ceiling in (("rounds", "federation.rounds", cfg.federation.rounds, c.max_rounds),
                                      ("local-steps", "train.local-steps", cfg.train.local_steps, c.max_local_steps),
                                      ("batch-size", "train.batch-size", cfg.train.batch_size, c.max_batch_size),
                                      ("max-length", "data.max-length", cfg.data.max_length, c.max_length),
                                      ("new-tokens", "eval.max-new-tokens", cfg.eval.max_new_tokens,
                                       c.max_new_tokens)):
        if value > ceiling:
            out.append((code, f"{key} {value} above the tenant's ceiling {ceiling}"))
    if policy.secagg.required and not cfg.secagg.enabled:
        out.append(("secagg", "secagg.enabled = false: the tenant trains only under secure aggregation"))
    if policy.secagg.required and 0 < cfg.secagg.neighbours < policy.secagg.min_neighbours:
        out.append(("secagg-neighbours", f"secagg.neighbours {cfg.secagg.neighbours} below the tenant's "
                                         f"{policy.secagg.min_neighbours}"))
    planned = cfg.federation.rounds if (cfg.federation.fraction_evaluate > 0 or
                                        cfg.federation.evaluate_with_train) else 0
    if planned > policy.evaluation.max_per_run:
        out.append(("evaluations", f"the run plans {planned} evaluations; the tenant answers "
                                   f"{policy.evaluation.max_per_run} per run"))
    out += base_problems(policy, cfg.model.base)
    return out


def _local_dp_problems(policy: TenantPolicy, cfg: Config, *, num_records: int) -> list[Problem]:
    from fedlora.client.privacy import noise_multiplier_for, sample_rate_for

    pr, p, out = policy.privacy, cfg.privacy, []
    if p.delta > pr.delta:
        out.append(("delta", f"privacy.delta {p.delta:g} above the tenant's {pr.delta:g}"))
    if p.budget > pr.lifetime_epsilon:
        out.append(("budget", f"privacy.budget {p.budget:g} above the tenant's lifetime epsilon "
                              f"{pr.lifetime_epsilon:g}"))
    if pr.require_poisson and p.sampling != "poisson":
        out.append(("sampling", f"privacy.sampling {p.sampling!r}: the tenant requires Poisson sampling"))
    if num_records < 1:
        return out
    q = sample_rate_for(num_records, cfg.train.batch_size)
    try:
        sigma = noise_multiplier_for(cfg, sample_rate=q)
    except ValueError:  # Opacus finds no noise that reaches the target
        out.append(("epsilon-per-run", f"no noise multiplier reaches privacy.target-epsilon "
                                       f"{p.target_epsilon:g}"))
        return out
    if sigma < pr.min_noise_multiplier:
        out.append(("noise-multiplier", f"noise multiplier {sigma:g} below the tenant's "
                                        f"{pr.min_noise_multiplier:g}"))
        return out  # a tiny sigma makes the accountant's epsilon meaningless (and slow)
    eps = _run_epsilon(sigma, q, cfg.federation.rounds * cfg.train.local_steps, pr.delta)
    if eps > pr.max_epsilon_per_run:
        out.append(("epsilon-per-run", f"the run would spend epsilon {eps:.3g} at the tenant's delta "
                                       f"{pr.delta:g}, above its {pr.max_epsilon_per_run:g} per run"))
    return out


@lru_cache(maxsize=256)
def _run_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """A whole run's epsilon at the tenant's delta (the accountant takes ~80 ms; every message asks)."""
    from fedlora.client.ledger import Spend, epsilon_of

    return epsilon_of([Spend(sigma, sample_rate, steps)], delta=delta)


_FINGERPRINTS: dict[tuple, str] = {}


def base_problems(policy: TenantPolicy, base: str) -> list[Problem]:
    """A base the policy does not list is refused without touching the file system (no
    existence probe); a listed one must still carry the fingerprint the policy pins."""
    if not policy.bases:
        return []
    if base not in policy.bases:
        return [("base", "model.base is not one of the tenant's accepted bases")]
    try:
        found = f"sha256:{fingerprint(base)}"
    except Exception as err:  # noqa: BLE001 - any failure to read the tenant's own base
        return [("base-missing", f"the tenant's accepted base {base!r} cannot be read on this node ({type(err).__name__})")]
    if found != policy.bases[base]:
        return [("base-fingerprint", f"the tenant's copy of {base!r} does not have the fingerprint its policy pins")]
    return []


def fingerprint(base: str) -> str:
    """:func:`fedlora.common.model.base_fingerprint`, cached per base and its files' sizes and times."""
    from fedlora.common.model import base_fingerprint, resolve_base

    root = Path(resolve_base(base))
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.glob("*")) if p.is_file()) \
        if root.is_dir() else ()
    key = (base, str(root), stamp)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = base_fingerprint(base)
    return _FINGERPRINTS[key]


def message_problems(policy: TenantPolicy, message_type: str, *, neighbours: int | None = None,
                     evaluations: int | None = None, lifetime_evaluations: int | None = None,
                     signed: bool = True) -> list[Problem]:
    """What only the message shows: its kind, its secure round's neighbourhood, the evaluations so
    far (this run's, and all runs'); ``signed``: whether the node checks its neighbours' keys (a roster)."""
    from fedlora.common import secagg_wire as wire

    out: list[Problem] = []
    if message_type == "train" and policy.secagg.required:
        out.append(("secagg", "a plain training message: the tenant trains only under secure aggregation"))
    if message_type == f"train.{wire.SETUP}" and neighbours is not None and neighbours < policy.secagg.min_neighbours:
        out.append(("secagg-neighbours", f"a secure round with {neighbours} neighbour(s); the tenant needs "
                                         f"{policy.secagg.min_neighbours}"))
    if message_type.startswith("train.secagg") and policy.secagg.signed and not signed:
        out.append(("secagg-unsigned", "the tenant takes part only in authenticated secure rounds, and this node "
                                       "has no roster to check its neighbours' keys against (--roster)"))
    if evaluations is not None and evaluations >= policy.evaluation.max_per_run:
        out.append(("evaluations", f"this run had its {policy.evaluation.max_per_run} evaluation(s); the tenant "
                                   "answers no more"))
    if lifetime_evaluations is not None and lifetime_evaluations >= policy.evaluation.max_lifetime:
        out.append(("evaluations-lifetime", f"the tenant has answered its {policy.evaluation.max_lifetime} "
                                            "evaluation(s) over all runs; it answers no more"))
    return out


def check(problems: list[Problem]) -> None:
    """Raise one :class:`PolicyDeclined` naming every problem (its code: the first's)."""
    if problems:
        seen: set[str] = set()
        unique = [(c, m) for c, m in problems if not (c in seen or seen.add(c))]  # one reason per code
        raise PolicyDeclined(unique[0][0], "; ".join(f"{msg} [{code}]" for code, msg in unique))

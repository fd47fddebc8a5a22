"""The checks behind ``fedlora.common.config.parse_config``: each value against its field (type,
allowed values, range), "did you mean" for unknown keys, and the rules that involve more
than one key. Each names the key(s) and what to do; ``parse_config`` collects every
problem into one :class:`~fedlora.common.config.ConfigError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedlora.common.config import (INDIVIDUAL_UPDATE_AGGREGATORS, AdapterConfig, FederationConfig, PrivacyConfig, SecAggConfig,
                                   SimulationConfig, TrainConfig)


def coerce(key: str, f: dataclasses.Field, value: Any, problems: list[str]) -> Any:
    typ = {"bool": bool, "int": int, "float": float, "str": str}[str(f.type)]
    meta = f.metadata
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(f"{key}: expected true or false, got {value!r}")
        return None
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            problems.append(f"{key}: expected an integer, got {value!r}")
            return None
        try:
            value = int(value)
        except ValueError:
            problems.append(f"{key}: expected an integer, got {value!r}")
            return None
    elif typ is float:
        if isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {value!r}")
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            problems.append(f"{key}: expected a number, got {value!r}")
            return None
        if value != value or value in (float("inf"), float("-inf")):
            problems.append(f"{key}: expected a finite number, got {value!r}")
            return None
    elif not isinstance(value, str):
        problems.append(f"{key}: expected a string, got {value!r}")
        return None
    if meta["choices"] and value not in meta["choices"]:
        problems.append(f"{key}: {value!r} is not allowed; choose one of {', '.join(meta['choices'])}")
        return None
    if meta["lo"] is not None and value < meta["lo"]:
        problems.append(f"{key}: {value!r} is below the minimum {meta['lo']}")
        return None
    if meta["hi"] is not None and value > meta["hi"]:
        problems.append(f"{key}: {value!r} is above the maximum {meta['hi']}")
        return None
    return value


def closest(key: str, known: list[str]) -> str:
    """A "did you mean" for an unknown key: a key of the same section whose name the typed
    one abbreviates (``train.lr`` -> ``train.learning-rate``) or starts, else the closest spelling."""
    import difflib

    section, _, name = key.partition(".")
    same = [k for k in known if k.startswith(section + ".")]
    names = {k.split(".", 1)[1]: k for k in same}
    for cand, full in names.items():
        initials = "".join(word[0] for word in cand.split("-") if word)
        if name and (name.replace("_", "-") == initials or cand.startswith(name.replace("_", "-"))):
            return f"; did you mean {full!r}?"
    match = difflib.get_close_matches(name, list(names), n=1) if names else []
    if match:
        return f"; did you mean {names[match[0]]!r}?"
    match = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def cross_check(sections: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Every cross-key check, appending to ``problems``."""
    adapter = sections.get("adapter", {})
    if adapter.get("method") == "ia3" and adapter.get("dropout", 0.0) > 0:
        problems.append("adapter.dropout: IA3 has no dropout; set it to 0 or use lora/dora")
    caps = sections.get("federation", {}).get("example_caps", "")
    if caps:
        from fedlora.common.weighting import parse_caps

        try:
            parse_caps(caps)
        except ValueError as why:
            problems.append(f"federation.example-caps: {why}")
    _check_privacy(sections, problems)
    _check_secagg(sections, problems)
    _check_optimizers(sections, problems)
    _check_lora_rule(sections, problems)
    run_dir = sections.get("run", {}).get("dir", "")
    if run_dir and not run_dir.startswith("/") and ":" not in run_dir[:3]:
        problems.append(f"run.dir: {run_dir!r} must be an absolute path (the ServerApp runs in the "
                        "SuperLink's working directory)")


def _check_privacy(sections: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Privacy settings that would make a guarantee unsound or unreachable."""
    def get(sec: str, name: str, cls: type) -> Any:
        return sections.get(sec, {}).get(name, getattr(cls(), name))

    mode = get("privacy", "mode", PrivacyConfig)
    if mode == "local":
        if get("train", "grad_accum", TrainConfig) != 1:
            problems.append("train.grad-accum: local DP needs 1 (the accountant counts one Poisson batch per "
                            "optimizer step); raise train.batch-size instead")
        if get("privacy", "sampling", PrivacyConfig) != "poisson" and not get("privacy", "allow_non_poisson",
                                                                               PrivacyConfig):
            problems.append("privacy.sampling: 'shuffle' breaks the RDP accountant's Poisson-sampling assumption "
                            "(the reported epsilon would not be a guarantee); use 'poisson' or set "
                            "privacy.allow-non-poisson = true")
        target = get("privacy", "target_epsilon", PrivacyConfig)
        if target == 0 and get("privacy", "noise_multiplier", PrivacyConfig) <= 0:
            problems.append("privacy.noise-multiplier: must be > 0 when privacy.target-epsilon is 0")
        if target > get("privacy", "budget", PrivacyConfig):
            problems.append(f"privacy.target-epsilon: {target} exceeds privacy.budget "
                            f"{get('privacy', 'budget', PrivacyConfig)}; every tenant would decline")
        if get("privacy", "max_grad_norm", PrivacyConfig) <= 0:
            problems.append("privacy.max-grad-norm: local DP needs a positive per-example clip norm")
    if mode == "central":
        if get("federation", "max_weight", FederationConfig) != 1:
            problems.append("federation.max-weight: central DP needs 1 (equal tenant weights bound one tenant's "
                            "influence on the sum by privacy.central-clip)")
        if get("privacy", "central_clip", PrivacyConfig) <= 0 or get("privacy", "central_noise_multiplier",
                                                                     PrivacyConfig) <= 0:
            problems.append("privacy.central-clip and privacy.central-noise-multiplier: central DP needs both > 0")
        aggregator = get("federation", "aggregator", FederationConfig)
        if aggregator != "fedavg":
            problems.append(f"federation.aggregator: central DP's sensitivity bound holds for the noised sum "
                            f"(fedavg), not for {aggregator!r}; use fedavg or privacy.mode = none")
        if get("secagg", "enabled", SecAggConfig) and not get("privacy", "trust_clients", PrivacyConfig):
            problems.append("privacy.mode: central DP with secure aggregation rests on every tenant clipping its "
                            "own delta (the server sees no update to clip; a malicious tenant is bounded only by "
                            "the per-element quantization range secagg.clip); set privacy.trust-clients = true "
                            "to accept that, or turn secure aggregation off")


def _check_secagg(sections: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Secure-aggregation settings that cannot work together.

    fp32 uses secagg.quantization-bits and secagg.modulus-bits as given; bf16 and int8 size
    the quantizer from the encoding and each round's tenants (``fedlora.common.secagg.sized_bits``),
    so only a modulus past 64 bits can fail there."""
    sec = {**dataclasses.asdict(SecAggConfig()), **sections.get("secagg", {})}
    fed = {**dataclasses.asdict(FederationConfig()), **sections.get("federation", {})}
    if not sec["enabled"]:
        return
    if fed["aggregator"] in INDIVIDUAL_UPDATE_AGGREGATORS:
        problems.append(f"federation.aggregator: {fed['aggregator']!r} needs individual updates, but secure "
                        "aggregation reveals only their sum; use fedavg or set secagg.enabled = false")
    tenants = sections.get("simulation", {}).get("tenants", SimulationConfig().tenants)
    if fed["delta_encoding"] != "fp32":
        from fedlora.common.secagg import sized_bits

        try:
            sized_bits(fed["delta_encoding"], max(int(tenants), 2), int(fed["max_weight"]))
        except ValueError as why:
            problems.append(f"federation.delta-encoding: {why}")
        return
    if sec["quantization_bits"] >= sec["modulus_bits"]:
        problems.append(f"secagg.quantization-bits: {sec['quantization_bits']} must be below "
                        f"secagg.modulus-bits {sec['modulus_bits']} (the sum must fit the modulus)")
    if fed["max_weight"] >= 2 ** sec["modulus_bits"]:
        problems.append("federation.max-weight: does not fit secagg.modulus-bits")
    capacity = (2 ** sec["modulus_bits"] - 1) // max(2 ** sec["quantization_bits"] - 1, fed["max_weight"], 1)
    if tenants > capacity:
        problems.append(f"secagg.modulus-bits: the sum of {tenants} tenants' vectors would overflow 2^"
                        f"{sec['modulus_bits']} (at most {capacity}); raise it or lower secagg.quantization-bits")


def _check_optimizers(sections: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Server-optimizer and FedProx values at the edge of their ranges that would not work.

    Only fedexp is tied to secure aggregation and central DP (it needs each update's norm);
    every other optimizer needs only the (noised) sum: post-processing, it runs under both."""
    fed = {**dataclasses.asdict(FederationConfig()), **sections.get("federation", {})}
    for name in ("server_beta1", "server_beta2"):
        if fed[name] >= 1.0:
            problems.append(f"federation.{name.replace('_', '-')}: {fed[name]!r} must be below 1 (a decay of 1 "
                            "never forgets the first rounds); 0.9 and 0.99 are the usual values")
    if fed["server_optimizer"] in ("fedadam", "fedyogi", "fedadagrad") and fed["server_tau"] <= 0:
        problems.append(f"federation.server-tau: {fed['server_optimizer']} needs tau > 0 (it keeps m / (sqrt(v) + "
                        "tau) finite where v is 0); 1e-3 is the usual value")
    if fed["server_optimizer"] == "fedexp":
        if sections.get("secagg", {}).get("enabled", False):
            problems.append("federation.server-optimizer: 'fedexp' sizes its step from each update's norm, but "
                            "secure aggregation reveals only their sum; use sgd or fedavgm, or turn secagg off")
        if sections.get("privacy", {}).get("mode", "none") == "central":
            problems.append("federation.server-optimizer: 'fedexp' sizes its step from the un-noised norms of the "
                            "updates, which central DP does not account for; use sgd or fedavgm with central DP")
        if fed["aggregator"] != "fedavg":
            problems.append(f"federation.server-optimizer: 'fedexp' sizes its step as the updates' mean squared norm "
                            f"over the squared norm of their mean, which holds for the mean (fedavg), not for "
                            f"{fed['aggregator']!r}: the updates it leaves out would still set the step; use fedavg, "
                            "or sgd / fedavgm with a robust aggregator")
    train = {**dataclasses.asdict(TrainConfig()), **sections.get("train", {})}
    if train["prox_mu"] * train["learning_rate"] > 1.0:
        problems.append(f"train.prox-mu: prox-mu x train.learning-rate = {train['prox_mu'] * train['learning_rate']:g} "
                        "> 1 would step past the global adapter; lower train.prox-mu or the learning rate")


def _check_lora_rule(sections: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Which LoRA rules combine with which methods, aggregators, optimizers, secure aggregation and DP.

    ffa and ab are linear in the updates: both run under secure aggregation, central DP, every
    aggregator and every server optimizer. svd multiplies each tenant's factors before averaging,
    which a sum of factors cannot give: it needs individual updates and averages them itself,
    stepping in product space (sgd's server-lr) because its factors are re-derived every round.
    Tenants of different ranks (``simulation.tenant-ranks``) need svd."""
    fed = {**dataclasses.asdict(FederationConfig()), **sections.get("federation", {})}
    rule = fed["lora_rule"]
    _check_tenant_ranks(sections, rule, problems)
    if rule == "ab":
        return
    method = sections.get("adapter", {}).get("method", "lora")
    if method != "lora":
        problems.append(f"federation.lora-rule: {rule!r} works on LoRA's A and B factors, not on {method!r}; "
                        "set adapter.method = lora or federation.lora-rule = ab")
    if rule != "svd":
        return
    if sections.get("secagg", {}).get("enabled", False):
        problems.append("federation.lora-rule: 'svd' multiplies each tenant's B and A before averaging, but secure "
                        "aggregation reveals only the sum of the factors; use ffa (exact under sums) or set "
                        "secagg.enabled = false")
    if fed["aggregator"] != "fedavg":
        problems.append(f"federation.lora-rule: 'svd' averages the tenants' products itself; it does not combine "
                        f"with federation.aggregator = {fed['aggregator']!r} (use fedavg)")
    if sections.get("privacy", {}).get("mode", "none") == "central":
        problems.append("federation.lora-rule: central DP noises the sum of the deltas, which 'svd' does not use; "
                        "use ffa or ab with central DP, or local DP with svd")
    if fed["server_optimizer"] != "sgd":
        problems.append(f"federation.server-optimizer: 'svd' re-derives both factors by an SVD every round (their "
                        f"basis rotates, their signs may flip), so {fed['server_optimizer']!r}'s moments kept per "
                        "factor element would mix unrelated directions; use sgd (federation.server-lr then steps "
                        "in product space) or federation.lora-rule = ab / ffa")


def _check_tenant_ranks(sections: dict[str, dict[str, Any]], rule: str, problems: list[str]) -> None:
    """``simulation.tenant-ranks``: one integer 1..adapter.r per simulated tenant, under svd only."""
    text = sections.get("simulation", {}).get("tenant_ranks", "")
    if not text:
        return
    from fedlora.common.lora import parse_ranks

    if rule != "svd":
        problems.append(f"simulation.tenant-ranks: tenants of different LoRA ranks need federation.lora-rule = svd "
                        f"(it is {rule!r}); set it, or leave simulation.tenant-ranks empty")
    try:
        ranks = parse_ranks(text)
    except ValueError as why:
        problems.append(f"simulation.tenant-ranks: {why}; write one integer per tenant, e.g. '8,4,2,8'")
        return
    tenants = sections.get("simulation", {}).get("tenants", SimulationConfig().tenants)
    if len(ranks) != tenants:
        problems.append(f"simulation.tenant-ranks: {len(ranks)} rank(s) for {tenants} tenant(s) "
                        "(simulation.tenants); give one per tenant")
    r = sections.get("adapter", {}).get("r", AdapterConfig().r)
    bad = [k for k in ranks if not 1 <= k <= r]
    if bad:
        problems.append(f"simulation.tenant-ranks: rank(s) {bad} outside 1..{r} (adapter.r)")

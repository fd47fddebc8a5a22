"""One typed configuration for every fedlora entry point.

Flower hands apps a *flat* run-config (``{"train.learning-rate": 0.002, ...}``) whose
values are bool/int/float/str only. :func:`parse_config` turns it into frozen
dataclasses, once, at the top of each entry point. Every unknown key and every bad value
is collected into one :class:`ConfigError` that lists all problems with the allowed
values, so a user fixes a scenario file in one go.

Defaults live here and only here; ``pyproject.toml``'s ``[tool.flwr.app.config]`` repeats
them because Flower requires it, and a test proves the two agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

Scalar = bool | int | float | str


def _opt(default: Any, help: str, *, choices: tuple | None = None,
         lo: float | None = None, hi: float | None = None) -> Any:
    """A config field with its documentation and its allowed values."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    # "embedded" (the tiny base shipped in simulations/base_model), a local
    # directory in Hugging Face format, or a hub id already in the local cache.
    base: str = _opt("embedded", "base model: 'embedded', a local HF directory or a cached hub id")
    # Weights of the frozen base: fp32, bf16, or nf4 (4-bit NormalFloat with double
    # quantization via bitsandbytes, i.e. QLoRA).
    precision: str = _opt("fp32", "base weights", choices=("fp32", "bf16", "nf4"))
    # Dtype the 4-bit layers compute in; "auto" is fp32 on CPU and bf16 on CUDA.
    compute_dtype: str = _opt("auto", "compute dtype", choices=("auto", "fp32", "bf16"))
    # Where to train: "auto" picks CUDA when available.
    device: str = _opt("auto", "device", choices=("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class AdapterConfig:
    # PEFT method: LoRA, DoRA (weight-decomposed LoRA) or IA3.
    method: str = _opt("lora", "PEFT method", choices=("lora", "dora", "ia3"))
    # LoRA rank.
    r: int = _opt(8, "LoRA rank", lo=1, hi=1024)
    # LoRA scaling numerator (scale = alpha / r).
    alpha: float = _opt(16.0, "LoRA alpha", lo=0.0)
    # Dropout on the LoRA input.
    dropout: float = _opt(0.0, "LoRA dropout", lo=0.0, hi=0.9)
    # "all-linear" or comma-separated module names, e.g. "q_proj,v_proj".
    target_modules: str = _opt("all-linear", "'all-linear' or comma-separated module names")


@dataclass(frozen=True)
class TrainConfig:
    # Optimizer steps each tenant takes per round (and per local-only run, per round).
    local_steps: int = _opt(25, "optimizer steps per round", lo=1)
    # Examples per micro-batch.
    batch_size: int = _opt(16, "examples per micro-batch", lo=1)
    # Micro-batches accumulated into one optimizer step.
    grad_accum: int = _opt(1, "gradient accumulation", lo=1)
    # Peak learning rate of AdamW.
    learning_rate: float = _opt(3e-3, "peak learning rate", lo=0.0, hi=1.0)
    # Learning-rate schedule over the steps of one local run.
    schedule: str = _opt("cosine", "LR schedule", choices=("constant", "linear", "cosine"))
    # Fraction of steps spent warming up linearly.
    warmup_ratio: float = _opt(0.1, "warm-up fraction", lo=0.0, hi=1.0)
    # AdamW weight decay.
    weight_decay: float = _opt(0.0, "weight decay", lo=0.0)
    # Gradient clipping by global norm (0 disables).
    max_grad_norm: float = _opt(1.0, "gradient clip norm (0 = off)", lo=0.0)
    # Seed for shuffling, dropout and initialisation.
    seed: int = _opt(0, "seed", lo=0)
    # Torch CPU threads (0 keeps torch's default).
    threads: int = _opt(0, "CPU threads (0 = default)", lo=0)


@dataclass(frozen=True)
class DataConfig:
    # Tenant file format: alpaca (instruction/input/output), chat (messages), or auto.
    format: str = _opt("auto", "JSONL format", choices=("auto", "alpaca", "chat"))
    # Directory holding tenant_XXX/{train,holdout}.jsonl in simulation (empty: the
    # simulate command fills it with synthetic tenants). Deployment nodes use the
    # node config's data-path instead.
    dir: str = _opt("", "directory of tenant_XXX/ folders (simulation)")
    # Longest tokenized example; longer ones are truncated and counted.
    max_length: int = _opt(128, "max tokens per example", lo=8)
    # Synthetic tenants: examples per tenant (train / holdout), share of the tenant's
    # home sub-domain, preference pairs, seed.
    train_size: int = _opt(256, "synthetic train rows per tenant", lo=1)
    holdout_size: int = _opt(48, "synthetic holdout rows per tenant", lo=1)
    own_fraction: float = _opt(0.85, "share of a tenant's rows from its home sub-domain", lo=0.0, hi=1.0)
    preference_size: int = _opt(256, "synthetic central preference pairs", lo=1)
    seed: int = _opt(0, "synthetic data seed", lo=0)


@dataclass(frozen=True)
class EvalConfig:
    # Greedy decoding budget for exact match.
    max_new_tokens: int = _opt(48, "greedy tokens per answer", lo=1)
    # Examples per generation batch.
    batch_size: int = _opt(48, "examples per generation batch", lo=1)
    # Forgetting-probe texts scored before vs after tuning.
    probe_size: int = _opt(64, "forgetting-probe texts", lo=1)


@dataclass(frozen=True)
class FederationConfig:
    # Federated rounds.
    rounds: int = _opt(4, "federated rounds", lo=1)
    # Fraction of connected tenants sampled per round, with a minimum.
    fraction_train: float = _opt(1.0, "fraction of tenants sampled per round", lo=0.0, hi=1.0)
    min_train_nodes: int = _opt(2, "minimum tenants per round", lo=1)
    # Fraction of tenants asked to evaluate each round.
    fraction_evaluate: float = _opt(1.0, "fraction of tenants evaluating per round", lo=0.0, hi=1.0)
    # Seconds the server waits for replies in one round; late tenants are dropped.
    round_timeout: float = _opt(900.0, "seconds to wait for replies per round", lo=1.0)
    # Examples counted for any one tenant at most: a tenant with more data still trains
    # on all of it but weighs no more than this in the mean (applied by the client too,
    # so it also holds when the server only sees sums).
    max_weight: int = _opt(1024, "cap on one tenant's FedAvg weight, in examples", lo=1)
    # Largest example count a reply may claim; more is refused as implausible.
    max_examples: int = _opt(100_000, "largest plausible example count per reply", lo=1)
    # Aggregation rule (name in server.aggregation's registry).
    aggregator: str = _opt("fedavg", "aggregator", choices=("fedavg",))
    # Server learning rate applied to the aggregated delta (1.0 = plain FedAvg).
    server_lr: float = _opt(1.0, "server learning rate on the mean delta", lo=0.0)


@dataclass(frozen=True)
class SimulationConfig:
    # Simulated tenants (Flower SuperNodes); tenant i gets synthetic sub-domain i % 4.
    tenants: int = _opt(4, "simulated tenants", lo=1, hi=10_000)
    # CPU cores reserved per tenant's ClientApp; 1 on a 2-core machine runs two at once.
    cpus_per_tenant: int = _opt(1, "CPU cores per simulated tenant", lo=1)


@dataclass(frozen=True)
class RunConfig:
    # Absolute directory for checkpoints, metrics and the report (the ServerApp's cwd
    # is the SuperLink's, so relative paths are refused). Empty: ./runs/<timestamp>.
    dir: str = _opt("", "run directory (absolute)")
    # Compare against untuned base, local-only and pooled adapters in the report.
    baselines: bool = _opt(True, "train local-only and pooled baselines for the report")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_flat(self) -> dict[str, Scalar]:
        """The flat ``section.key-name`` form Flower's run-config uses."""
        return {key: getattr(getattr(self, sec), f.name) for key, sec, f in _fields()}

    def replace(self, **flat: Scalar) -> "Config":
        """A copy with some flat keys changed (validated like any other input)."""
        return parse_config({**self.to_flat(), **flat})


class ConfigError(ValueError):
    """Every problem found in one run-config, listed together."""

    def __init__(self, problems: list[str], source: str = "run config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


def _key(section: str, name: str) -> str:
    return f"{section}.{name.replace('_', '-')}"


def _fields():
    for sec_field in dataclasses.fields(Config):
        for f in dataclasses.fields(sec_field.default_factory):  # type: ignore[arg-type]
            yield _key(sec_field.name, f.name), sec_field.name, f


def describe() -> list[tuple[str, Scalar, str]]:
    """(key, default, help) for every key, for ``--help`` texts and docs."""
    out = []
    for key, _sec, f in _fields():
        meta = f.metadata
        extra = f" (one of {', '.join(meta['choices'])})" if meta["choices"] else ""
        out.append((key, f.default, meta["help"] + extra))
    return out


def _coerce(key: str, f: dataclasses.Field, value: Any, problems: list[str]) -> Any:
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


def _closest(key: str, known: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def parse_config(flat: Mapping[str, Any], *, source: str = "run config") -> Config:
    """Build a :class:`Config` from a flat run-config, or raise one :class:`ConfigError`."""
    problems: list[str] = []
    known = {key: (sec, f) for key, sec, f in _fields()}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key not in known:
            problems.append(f"{key}: unknown key{_closest(key, list(known))}")
            continue
        sec, f = known[key]
        coerced = _coerce(key, f, value, problems)
        if coerced is not None:
            sections.setdefault(sec, {})[f.name] = coerced
    _cross_check(sections, problems)
    if problems:
        raise ConfigError(problems, source)
    kwargs = {}
    for sec_field in dataclasses.fields(Config):
        kwargs[sec_field.name] = sec_field.default_factory(**sections.get(sec_field.name, {}))
    return Config(**kwargs)


def _cross_check(sections: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Checks that involve more than one key."""
    adapter = sections.get("adapter", {})
    if adapter.get("method") == "ia3" and adapter.get("dropout", 0.0) > 0:
        problems.append("adapter.dropout: IA3 has no dropout; set it to 0 or use lora/dora")
    run_dir = sections.get("run", {}).get("dir", "")
    if run_dir and not run_dir.startswith("/") and ":" not in run_dir[:3]:
        problems.append(f"run.dir: {run_dir!r} must be an absolute path (the ServerApp runs in the "
                        "SuperLink's working directory)")

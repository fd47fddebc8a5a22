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

from fedlora.common.weighting import WEIGHTINGS

Scalar = bool | int | float | str

# Aggregators (fedlora.server.aggregation.AGGREGATORS) and those needing every individual update,
# which secure aggregation does not reveal (a test proves both match the registry).
AGGREGATOR_NAMES = ("fedavg", "median", "trimmed-mean", "krum")
INDIVIDUAL_UPDATE_AGGREGATORS = frozenset({"median", "trimmed-mean", "krum"})
SERVER_OPTIMIZER_NAMES = ("sgd", "fedexp", "fedavgm", "fedadam", "fedyogi", "fedadagrad")  # fedlora.server.optimizers.OPTIMIZERS
LORA_RULES = ("ab", "ffa", "svd")  # fedlora.server.lora_rules
DELTA_ENCODINGS = ("fp32", "bf16", "int8")  # fedlora.common.encoding


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
    local_steps: int = _opt(12, "optimizer steps per round", lo=1)
    # Examples per micro-batch.
    batch_size: int = _opt(16, "examples per micro-batch", lo=1)
    # Micro-batches accumulated into one optimizer step.
    grad_accum: int = _opt(1, "gradient accumulation", lo=1)
    # Peak learning rate of AdamW.
    learning_rate: float = _opt(6e-3, "peak learning rate", lo=0.0, hi=1.0)
    # Learning-rate schedule.
    schedule: str = _opt("cosine", "LR schedule", choices=("constant", "linear", "cosine"))
    # What the schedule spans for a federated tenant: "run" (all its rounds x local steps;
    # warm-up once, decay over the run, like the baselines' single run) or "round" (every
    # round restarts warm-up and decay).
    schedule_span: str = _opt("run", "what the LR schedule spans", choices=("run", "round"))
    # Fraction of steps spent warming up linearly.
    warmup_ratio: float = _opt(0.1, "warm-up fraction", lo=0.0, hi=1.0)
    # AdamW weight decay.
    weight_decay: float = _opt(0.0, "weight decay", lo=0.0)
    # FedProx (fedlora.client.prox), federated rounds only: after each step w -= lr * prox-mu * (w - round's global); 0 = off.
    prox_mu: float = _opt(0.0, "FedProx mu: pull toward the round's global adapter (0 = off)", lo=0.0)
    # Gradient clipping by global norm (0 disables).
    max_grad_norm: float = _opt(1.0, "gradient clip norm (0 = off)", lo=0.0)
    # Seed for shuffling, dropout and initialisation.
    seed: int = _opt(0, "seed", lo=0)
    # Torch CPU threads (0 keeps torch's default).
    threads: int = _opt(0, "CPU threads (0 = default)", lo=0)
    # Recompute activations in the backward pass instead of keeping them (reentrant, so
    # Opacus' hooks still see every layer): less memory for large bases, ~30 % more time.
    gradient_checkpointing: bool = _opt(False, "gradient checkpointing (less memory, more time)")


@dataclass(frozen=True)
class DataConfig:
    # Tenant file format: alpaca (instruction/input/output), chat (messages), or auto.
    format: str = _opt("auto", "JSONL format", choices=("auto", "alpaca", "chat"))
    # How rows become token sequences: "chat" renders every row through the base
    # tokenizer's chat template, "alpaca" through the fixed ### Instruction template,
    # "auto" uses the chat template when the base's tokenizer has one.
    template: str = _opt("auto", "prompt template", choices=("auto", "chat", "alpaca"))
    # Directory holding tenant_XXX/{train,holdout}.jsonl in simulation (empty: synthetic
    # tenants, one per SuperNode: `fedlora simulate` writes them into the run, a bare
    # `flwr run` into <fedlora home>/synthetic). Deployment nodes use their data-path.
    dir: str = _opt("", "directory of tenant_XXX/ folders (simulation)")
    # Longest tokenized example; longer ones are truncated and counted.
    max_length: int = _opt(128, "max tokens per example", lo=8)
    # Synthetic tenants: examples per tenant (train / holdout), share of the tenant's
    # home sub-domain, preference pairs, seed.
    train_size: int = _opt(4096, "synthetic train rows per tenant", lo=1)
    holdout_size: int = _opt(96, "synthetic holdout rows per tenant", lo=1)
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
    rounds: int = _opt(10, "federated rounds", lo=1)
    # Fraction of connected tenants sampled per round, with a minimum.
    fraction_train: float = _opt(1.0, "fraction of tenants sampled per round", lo=0.0, hi=1.0)
    min_train_nodes: int = _opt(2, "minimum tenants per round", lo=1)
    # Fraction of tenants asked to evaluate each round.
    fraction_evaluate: float = _opt(1.0, "fraction of tenants evaluating per round", lo=0.0, hi=1.0)
    # Evaluate each round's global adapter at the start of the next round's training message
    # (on the tenants sampled to train), one exchange per round fewer; the last round's on its own.
    evaluate_with_train: bool = _opt(False, "evaluate each round's adapter with the next round's training message")
    # Seconds the server waits for replies in one round; late tenants are dropped.
    round_timeout: float = _opt(900.0, "seconds to wait for replies per round", lo=1.0)
    # Examples counted for any one tenant at most: a tenant with more data still trains
    # on all of it but weighs no more than this in the mean (applied by the client too,
    # so it also holds when the server only sees sums).
    max_weight: int = _opt(1024, "cap on one tenant's FedAvg weight, in examples", lo=1)
    # Operator-declared caps per registered node, "NODE-ID:MAX-EXAMPLES,..." (deployment;
    # written by `fedlora deploy register --max-examples`); the server credits a node at
    # most its cap, whatever it claims. Empty: none.
    example_caps: str = _opt("", "per-node example caps 'NODE-ID:N,...' (deployment)")
    # The tenant behind each registered node, "NODE-ID:TENANT,..." (deployment; written by
    # `fedlora deploy register --tenant-id`): a reply must claim its node's tenant, and a node
    # without one is refused. Empty: each node's first claim binds it for the run.
    tenant_nodes: str = _opt("", "tenant id of each registered node 'NODE-ID:TENANT,...' (deployment)")
    # Largest example count a reply may claim; more is refused as implausible.
    max_examples: int = _opt(100_000, "largest plausible example count per reply", lo=1)
    # A tenant's weight from its claimed example count: examples (FedAvg), sqrt-examples,
    # or uniform (fedlora.common.weighting); capped at max-weight either way.
    weighting: str = _opt("examples", "tenant weight rule (under secure aggregation every tenant weighs 1)",
                          choices=WEIGHTINGS)
    # Adaptive weight bound: no tenant weighs more than this x the round's median weight
    # (0 = off); a tenant over it is capped and flagged.
    weight_multiplier: float = _opt(2.0, "cap on a tenant's weight, x the round's median weight (0 = off)", lo=0.0)
    # Aggregation rule (fedlora.server.aggregation's registry): fedavg needs only the sum; median,
    # trimmed-mean and krum need every individual update (refused with secure aggregation).
    aggregator: str = _opt("fedavg", "aggregator", choices=AGGREGATOR_NAMES)
    # trimmed-mean: share of tenants dropped at each end, per coordinate.
    trim_beta: float = _opt(0.25, "trimmed-mean: share trimmed at each end", lo=0.0, hi=0.49)
    # krum: Byzantine tenants tolerated (f) and updates averaged (m; 0 = n - f).
    krum_f: int = _opt(1, "krum: Byzantine tenants tolerated", lo=0)
    krum_m: int = _opt(0, "krum: updates averaged (0 = n - f)", lo=0)
    # Fewer aggregated rounds than this and the run counts as failed: nothing is refined,
    # merged or published from it.
    min_successful_rounds: int = _opt(1, "fewest aggregated rounds for a run to count", lo=0)
    # Server learning rate on the aggregated delta (1.0 = plain FedAvg; the adaptive optimizers want ~1e-2..1e-1).
    server_lr: float = _opt(1.0, "server learning rate on the mean delta", lo=0.0)
    # Rule turning the mean delta into the next global adapter (fedlora.server.optimizers); it needs only the sum, so it
    # also runs under secure aggregation and central DP (post-processing). beta1: fedavgm's momentum and the
    # first-moment decay; beta2: the second-moment decay; tau: the floor in m / (sqrt(v) + tau).
    server_optimizer: str = _opt("sgd", "server optimizer on the mean delta", choices=SERVER_OPTIMIZER_NAMES)
    server_beta1: float = _opt(0.9, "server optimizer: momentum / first-moment decay (< 1)", lo=0.0, hi=1.0)
    server_beta2: float = _opt(0.99, "server optimizer: second-moment decay (< 1)", lo=0.0, hi=1.0)
    server_tau: float = _opt(1e-3, "server optimizer: tau in m / (sqrt(v) + tau) (> 0)", lo=0.0)
    # How LoRA's factors are federated: ab averages the A and B deltas separately; ffa freezes A at the
    # shared seeded initialisation and federates only B (FFA-LoRA: exact); svd averages the tenants' products
    # B A and factors the mean back to rank r (FlexLoRA; individual updates; tenants may differ in rank).
    lora_rule: str = _opt("ab", "how LoRA factors are aggregated", choices=LORA_RULES)
    # What a tenant's delta travels as: fp32, bf16 (half the bytes), int8 with a float32 scale per row or
    # tensor (about a quarter); the rounding error stays on the tenant for its next delta (error feedback).
    delta_encoding: str = _opt("fp32", "wire encoding of a tenant's delta", choices=DELTA_ENCODINGS)
    int8_scale: str = _opt("row", "int8 encoding: one scale per row or per tensor", choices=("row", "tensor"))
    error_feedback: bool = _opt(True, "keep the encoding's rounding error on the tenant for its next delta")
    # Server-side bound on each update's L2 norm (plain transport): absolute (0 = off) ...
    max_update_norm: float = _opt(0.0, "absolute bound on an update's L2 norm (0 = off)", lo=0.0)
    # ... and adaptive: this x the round's median update norm (0 = off). The tighter applies.
    norm_multiplier: float = _opt(3.0, "adaptive bound on an update's L2 norm, x the round's median (0 = off)",
                                  lo=0.0)
    # What happens to an update over the bound: dropped, or scaled down to the bound.
    bound_policy: str = _opt("drop", "update over the norm bound", choices=("drop", "clip"))
    # The direction screen (fedlora.server.screen): an update whose cosine similarity to the
    # round's coordinate-wise median update is below this ...
    outlier_cosine: float = _opt(0.0, "direction screen: an update whose cosine to the round's median update is "
                                 "below this is an outlier", lo=-1.0, hi=1.0)
    # ... or below this x the round's median of those cosines (0 = off) ...
    outlier_cosine_ratio: float = _opt(0.5, "direction screen: ... or below this x the round's median cosine "
                                       "(0 = off)", lo=0.0, hi=1.0)
    # ... is dropped, or only flagged in the audit (always only flagged under central DP).
    outlier_action: str = _opt("drop", "direction screen: what happens to an outlier", choices=("drop", "flag"))
    # The screen's median and cosines on this many coordinates, drawn per round with a key
    # nobody else knows (0 = every coordinate).
    audit_coordinates: int = _opt(65536, "coordinates the direction screen and the audit sample each round "
                                  "(0 = all)", lo=0)


@dataclass(frozen=True)
class SimulationConfig:
    # Simulated tenants (Flower SuperNodes); tenant i gets synthetic sub-domain i % 4.
    tenants: int = _opt(4, "simulated tenants", lo=1, hi=10_000)
    # CPU cores reserved per tenant's ClientApp; 1 on a 2-core machine runs two at once.
    cpus_per_tenant: int = _opt(1, "CPU cores per simulated tenant", lo=1)
    # LoRA rank of each simulated tenant, "R0,R1,..." (each <= adapter.r; federation.lora-rule = svd only). Empty: all r.
    tenant_ranks: str = _opt("", "LoRA rank per simulated tenant 'R0,R1,...' (lora-rule svd; empty: adapter.r)")
    # Tenant policy file(s) (`fedlora policy init`): one file every simulated tenant answers under, or
    # "F0,F1,..." one per tenant (an empty entry: none). Simulation only: a deployment node has its own
    # (`fedlora deploy supernode --policy`) and never takes one from the run config. Empty: none.
    tenant_policy: str = _opt("", "tenant policy file for every simulated tenant, or 'F0,F1,...' one each")
    # Where simulated tenants keep their privacy ledgers (tenant_XXX/ inside it); empty: beside each
    # tenant's files, as a real node does. Simulation only, like tenant-policy. `fedlora simulate`
    # points its own without-DP comparison run here, so that run never charges the tenants' ledgers.
    ledger_dir: str = _opt("", "simulated tenants' ledger directory (empty: beside each tenant's data)")


@dataclass(frozen=True)
class RunConfig:
    # Absolute directory for checkpoints, metrics and the report (the ServerApp runs in the SuperLink's cwd).
    # Empty: ./runs/<timestamp> (fedlora simulate/deploy), <fedlora home>/runs/<timestamp>-<run id> (flwr run).
    dir: str = _opt("", "run directory (absolute)")
    # Continue the run in run.dir after its last complete round (its checkpoint and round
    # records), instead of starting at round 1. Set by `fedlora simulate --resume`.
    resume: bool = _opt(False, "continue run.dir after its last complete round")
    # Compare against untuned base, local-only and pooled adapters in the report.
    baselines: bool = _opt(True, "train local-only and pooled baselines for the report")
    # The pooled baseline's budget. "rounds": the optimizer steps the global adapter took
    # (rounds x local steps), each step accumulating one micro-batch per tenant of a round,
    # so it sees the federation's examples in the federation's number of steps (FedSGD's
    # centralised twin). "examples": the same examples at the tenants' batch size, i.e.
    # tenants-per-round times as many sequential steps.
    pooled_budget: str = _opt("rounds", "pooled baseline budget", choices=("rounds", "examples"))


@dataclass(frozen=True)
class PrivacyConfig:
    # none: no differential privacy; local: record-level DP-SGD (Opacus) on every tenant,
    # with a persistent per-tenant ledger; central: tenant-level DP (clients clip their
    # delta, the server adds Gaussian noise once to the sum and accounts epsilon).
    mode: str = _opt("none", "differential privacy", choices=("none", "local", "central"))
    # Local DP: epsilon one run may spend per tenant (noise is calibrated for
    # federation.rounds x train.local-steps steps); 0 = use noise-multiplier instead.
    target_epsilon: float = _opt(8.0, "local DP: epsilon per tenant per run (0 = use noise-multiplier)", lo=0.0)
    # Delta of every (epsilon, delta) guarantee, local and central.
    delta: float = _opt(1e-5, "DP delta", lo=0.0, hi=0.1)
    # Local DP: Gaussian noise std / clip norm, used only when target-epsilon is 0.
    noise_multiplier: float = _opt(1.0, "local DP noise multiplier (when target-epsilon = 0)", lo=0.0)
    # Local DP: L2 clip of each example's gradient.
    max_grad_norm: float = _opt(1.0, "local DP per-example gradient clip norm", lo=0.0)
    # Local DP: most epsilon a tenant may ever spend (its ledger, across rounds and runs);
    # a tenant whose next round would exceed it declines to train.
    budget: float = _opt(10.0, "local DP: lifetime epsilon budget per tenant", lo=0.0)
    # Local DP batch sampling: poisson (what the accountant assumes) or shuffle
    # (fixed-size batches; refused unless allow-non-poisson is true).
    sampling: str = _opt("poisson", "local DP batch sampling", choices=("poisson", "shuffle"))
    # Accept shuffle sampling although the reported epsilon is then not a guarantee.
    allow_non_poisson: bool = _opt(False, "accept non-Poisson sampling (epsilon no longer guaranteed)")
    # Opacus per-sample gradient engine.
    grad_sample_mode: str = _opt("ew", "Opacus grad-sample mode", choices=("ew", "hooks", "functorch"))
    # Central DP: L2 clip of each tenant's whole adapter delta, on the client and again on
    # the server for every update it sees (plain transport).
    central_clip: float = _opt(0.5, "central DP: clip norm of a tenant's delta", lo=0.0)
    # Central DP with secure aggregation: the server cannot clip what it cannot see, so the
    # sensitivity bound rests on every tenant clipping honestly. Refused unless this is true.
    trust_clients: bool = _opt(False, "central DP under secure aggregation: accept a bound enforced only by clients")
    # Central DP: noise std on the sum of deltas / central-clip.
    central_noise_multiplier: float = _opt(1.0, "central DP noise multiplier", lo=0.0)
    # Report: also run the federation without DP (no baselines) to compare quality.
    compare_without_dp: bool = _opt(True, "also run without DP to report quality with vs without")


@dataclass(frozen=True)
class SecAggConfig:
    # Secure aggregation (SecAgg+): the server learns only the sum of the sampled
    # tenants' weighted deltas and their total weight.
    enabled: bool = _opt(False, "secure aggregation (SecAgg+)")
    # Neighbours each tenant masks with and shares its secrets among (k of the k-regular
    # graph); 0 = every other sampled tenant (the complete graph).
    neighbours: int = _opt(0, "SecAgg+ neighbours per tenant (0 = all)", lo=0)
    # A tenant's secrets are rebuilt from strictly more than this share of its share
    # holders (itself and its neighbours); >= 0.5 so no two disjoint sets both succeed.
    threshold: float = _opt(0.5, "share of holders needed to rebuild a secret (strictly more than)",
                            lo=0.5, hi=0.99)
    # Largest |(weight / federation.max-weight) * delta| a tenant may send; larger is refused.
    clip: float = _opt(8.0, "quantization clipping range (+-)", lo=1.0)
    # Quantization levels 2**bits over [-clip, clip]; error per tenant <= clip / (2**bits - 1).
    quantization_bits: int = _opt(22, "quantization bits", lo=4, hi=52)
    # Masked arithmetic is mod 2**modulus-bits (32: uint32 on the wire, as many bytes as fp32).
    modulus_bits: int = _opt(32, "bits of the masking modulus", lo=16, hi=64)
    # Seconds to wait for replies in the setup, key-sharing and unmasking stages (the
    # masked upload, which trains, waits federation.round-timeout).
    stage_timeout: float = _opt(300.0, "seconds per secure-aggregation stage", lo=1.0)
    # When a round cannot be unmasked: keep the global adapter and go on, or stop the run.
    on_failure: str = _opt("continue", "after a failed secure round", choices=("continue", "stop"))


@dataclass(frozen=True)
class DPOConfig:
    # Refine the aggregated adapter with DPO on the central preference set after the rounds.
    enabled: bool = _opt(True, "run central DPO after the federated rounds")
    # DPO temperature: larger keeps the policy closer to the reference (the aggregate).
    beta: float = _opt(0.1, "DPO beta", lo=0.0)
    # Peak learning rate of the DPO optimizer (linear decay).
    learning_rate: float = _opt(3e-4, "DPO learning rate", lo=0.0, hi=1.0)
    # Optimizer steps over the preference pairs.
    steps: int = _opt(40, "DPO optimizer steps", lo=1)
    # Preference pairs per step.
    batch_size: int = _opt(8, "preference pairs per DPO step", lo=1)
    # Longest prompt + answer in tokens; longer pairs are truncated at the end.
    max_length: int = _opt(192, "max tokens of prompt + answer", lo=8)
    # Weight of an added SFT loss on the chosen answers (RPO); keeps their likelihood up
    # so greedy answers do not degrade. 0 = plain DPO.
    sft_weight: float = _opt(0.0, "weight of the SFT term on chosen answers (0 = plain DPO)", lo=0.0)


@dataclass(frozen=True)
class PublishConfig:
    # Merge the final adapter into an fp32 base and publish a signed version after the run.
    enabled: bool = _opt(True, "merge and publish a signed version after the run")
    # Registry root; versions go to <registry>/<name>/<version>/. Empty: <run dir>/registry.
    registry: str = _opt("", "registry directory (empty: <run dir>/registry)")
    # Model name in the registry.
    name: str = _opt("fedlora-model", "model name in the registry")
    # Version label; empty picks the next free v1, v2, ...
    version: str = _opt("", "version label (empty: next free vN)")
    # Ed25519 private key (from `fedlora keys signing`); empty: a key made in <run dir>/keys.
    signing_key: str = _opt("", "Ed25519 signing key file (empty: one made in <run dir>/keys)")


@dataclass(frozen=True)
class DeploymentConfig:
    # Flower engine running the apps; set by the launcher (`fedlora simulate` or
    # `fedlora deploy run`) and stated in the report.
    engine: str = _opt("simulation", "Flower engine running the apps", choices=("simulation", "deployment"))
    # SuperNodes reach the SuperLink over TLS (stated by the launcher; reported).
    tls: bool = _opt(False, "SuperNodes connect over TLS (deployment)")
    # The SuperLink admits only registered SuperNode keys (--enable-supernode-auth; reported).
    node_auth: bool = _opt(False, "SuperNode authentication on (deployment)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
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


def parse_config(flat: Mapping[str, Any], *, source: str = "run config") -> Config:
    """Build a :class:`Config` from a flat run-config, or raise one :class:`ConfigError`."""
    from fedlora.common.config_rules import closest, coerce, cross_check  # the rules import this module

    problems: list[str] = []
    known = {key: (sec, f) for key, sec, f in _fields()}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key not in known:
            problems.append(f"{key}: unknown key{closest(key, list(known))}")
            continue
        sec, f = known[key]
        coerced = coerce(key, f, value, problems)
        if coerced is not None:
            sections.setdefault(sec, {})[f.name] = coerced

    cross_check(sections, problems)
    if problems:
        raise ConfigError(problems, source)
    return Config(**{f.name: f.default_factory(**sections.get(f.name, {})) for f in dataclasses.fields(Config)})

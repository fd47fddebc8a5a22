"""A tenant's own privacy policy: a TOML file the tenant owns, which no run config can override.

The server's run config says how a federation wants to train; the policy says what this
tenant accepts. Every message is checked against it before any work
(:mod:`fedlora.client.policy_mod`); a task that breaks it is declined with a reason code
(``policy: noise multiplier 1e-06 below the tenant's 0.8``), the whole request goes to the
node's own log, and nothing is trained, evaluated or charged.

    fedlora policy init policy.toml      # a commented default
    fedlora policy check policy.toml --data train.jsonl

This module only reads and checks; it imports no torch.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PRIVACY_MODES = ("local", "local-or-central", "any")
ERROR_DETAIL = ("code", "full")
TRAIN_METRIC_CHOICES = ("train-loss", "train-first-loss", "train-steps", "train-tokens", "train-seconds",
                        "truncated", "dp-epsilon")
EVAL_METRIC_CHOICES = ("eval-exact-match", "eval-json-valid", "eval-loss", "eval-seconds")


class PolicyError(ValueError):
    """The policy file is missing, not TOML, or breaks its own rules (every problem listed)."""


class PolicyDeclined(RuntimeError):
    """A task breaks the tenant's policy; ``code`` is the reason code, ``public`` what the server is told."""

    def __init__(self, code: str, public: str) -> None:
        super().__init__(f"policy: {public}")
        self.code, self.public = code, public


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PrivacyRules:
    mode: str = _f("local", "privacy mode a run must use: local (DP-SGD on this node), local-or-central, or any")
    delta: float = _f(1e-6, "this tenant's own delta for every epsilon it accounts; at most 1 / training records")
    max_epsilon_per_run: float = _f(2.0, "largest epsilon one run may spend, at this delta")
    lifetime_epsilon: float = _f(8.0, "largest epsilon ever (the ledger, all runs), at this delta")
    min_noise_multiplier: float = _f(0.8, "smallest DP-SGD noise multiplier accepted")
    require_poisson: bool = _f(True, "DP-SGD must use Poisson sampling (what the accountant assumes)")
    min_batch_size: int = _f(8, "smallest micro-batch a training step may use, in any mode")


@dataclass(frozen=True)
class SecAggRules:
    required: bool = _f(True, "train only under secure aggregation (no plain training reply)")
    min_neighbours: int = _f(2, "fewest neighbours a secure round may give this tenant")
    signed: bool = _f(False, "take part only in authenticated rounds: the node has a roster (--roster) and "
                             "refuses neighbours whose keys are not signed by their rostered identity key")


@dataclass(frozen=True)
class ComputeRules:
    max_rounds: int = _f(50, "most federated rounds per run")
    max_local_steps: int = _f(100, "most optimizer steps per round")
    max_batch_size: int = _f(64, "largest micro-batch")
    max_length: int = _f(1024, "longest tokenized example")
    max_new_tokens: int = _f(256, "most tokens generated per evaluation answer")


@dataclass(frozen=True)
class EvaluationRules:
    max_per_run: int = _f(20, "most evaluations answered per run (the ledger counts them)")
    max_lifetime: int = _f(1000, "most evaluations answered over all runs together: a server cannot "
                                 "split its questions over many runs")
    metrics: tuple[str, ...] = _f(("eval-exact-match", "eval-json-valid", "eval-loss"),
                                  "evaluation metrics that leave the node (the others are withheld)")
    round_to: float = _f(0.01, "metrics leave rounded to this step (0 = exact)")
    noise: float = _f(0.0, "Gaussian noise std added to each metric that leaves (0 = none)")


@dataclass(frozen=True)
class ReplyRules:
    train_metrics: tuple[str, ...] = _f(("train-steps", "train-seconds", "dp-epsilon"),
                                        "training metrics that leave the node (the example count and "
                                        "tenant id always do)")
    errors: str = _f("code", "what an error tells the server: code (a reason code and a short public "
                             "message; details in the node's log) or full (the error text)")


@dataclass(frozen=True)
class LedgerRules:
    dir: str = _f("", "directory of this tenant's privacy ledgers, one per data digest "
                      "(empty: <fedlora home>/ledgers)")


@dataclass(frozen=True)
class TenantPolicy:
    privacy: PrivacyRules = field(default_factory=PrivacyRules)
    secagg: SecAggRules = field(default_factory=SecAggRules)
    compute: ComputeRules = field(default_factory=ComputeRules)
    evaluation: EvaluationRules = field(default_factory=EvaluationRules)
    reply: ReplyRules = field(default_factory=ReplyRules)
    ledger: LedgerRules = field(default_factory=LedgerRules)
    # model.base values this node loads, each pinned by its fingerprint; empty: any base
    bases: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the file it was read from

    @property
    def limits(self) -> "PrivacyLimits":
        p = self.privacy
        return PrivacyLimits(delta=p.delta, lifetime_epsilon=p.lifetime_epsilon,
                             max_epsilon_per_run=p.max_epsilon_per_run)

    def ledger_dir(self) -> Path:
        from fedlora.common.files import fedlora_home

        return Path(self.ledger.dir).expanduser().resolve() if self.ledger.dir else fedlora_home() / "ledgers"


@dataclass(frozen=True)
class PrivacyLimits:
    """What the ledger enforces for a policy: the tenant's delta and its two epsilon caps."""

    delta: float
    lifetime_epsilon: float
    max_epsilon_per_run: float


_SECTIONS = {"privacy": PrivacyRules, "secagg": SecAggRules, "compute": ComputeRules,
             "evaluation": EvaluationRules, "reply": ReplyRules, "ledger": LedgerRules}


def _coerce(where: str, f, value: Any, problems: list[str]) -> Any:
    want = type(f.default)
    if want is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{where}: expected a list of strings, got {value!r}")
            return None
        return tuple(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not want:
        problems.append(f"{where}: expected {want.__name__}, got {type(value).__name__} {value!r}")
        return None
    return value


def parse_policy(doc: dict, *, source: str = "policy") -> TenantPolicy:
    """A :class:`TenantPolicy` from a parsed TOML document, or one :class:`PolicyError` listing every problem."""
    problems: list[str] = []
    sections: dict[str, dict] = {}
    for name, body in doc.items():
        if name == "bases":
            if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
                problems.append("bases: expected a table of model.base = \"sha256:...\"")
            continue
        if name not in _SECTIONS or not isinstance(body, dict):
            problems.append(f"[{name}]: unknown section (known: {', '.join([*_SECTIONS, 'bases'])})")
            continue
        known = {f.name.replace("_", "-"): f for f in fields(_SECTIONS[name])}
        for key, value in body.items():
            if key not in known:
                problems.append(f"{name}.{key}: unknown key (known: {', '.join(known)})")
                continue
            coerced = _coerce(f"{name}.{key}", known[key], value, problems)
            if coerced is not None:
                sections.setdefault(name, {})[known[key].name] = coerced
    if not problems:
        policy = TenantPolicy(**{n: cls(**sections.get(n, {})) for n, cls in _SECTIONS.items()},
                              bases=dict(doc.get("bases", {})), source=source)
        problems += _rule_problems(policy)
    if problems:
        raise PolicyError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    return policy


def _rule_problems(p: TenantPolicy) -> list[str]:
    out = []
    pr = p.privacy
    if pr.mode not in PRIVACY_MODES:
        out.append(f"privacy.mode: {pr.mode!r} is not one of {', '.join(PRIVACY_MODES)}")
    if not 0 < pr.delta < 1:
        out.append(f"privacy.delta: {pr.delta:g} must be in (0, 1)")
    for name in ("max_epsilon_per_run", "lifetime_epsilon", "min_noise_multiplier"):
        if not getattr(pr, name) >= 0 or math.isnan(getattr(pr, name)):
            out.append(f"privacy.{name.replace('_', '-')}: must be >= 0")
    if pr.max_epsilon_per_run > pr.lifetime_epsilon:
        out.append(f"privacy.max-epsilon-per-run ({pr.max_epsilon_per_run:g}) exceeds privacy.lifetime-epsilon "
                   f"({pr.lifetime_epsilon:g})")
    for where, value in (("privacy.min-batch-size", pr.min_batch_size), ("secagg.min-neighbours",
                                                                        p.secagg.min_neighbours),
                         *((f"compute.{f.name.replace('_', '-')}", getattr(p.compute, f.name))
                           for f in fields(ComputeRules)), ("evaluation.max-per-run", p.evaluation.max_per_run),
                                         ("evaluation.max-lifetime", p.evaluation.max_lifetime)):
        if value < (0 if where in ("evaluation.max-per-run", "evaluation.max-lifetime", "secagg.min-neighbours")
                    else 1):
            out.append(f"{where}: {value} is too small")
    if pr.min_batch_size > p.compute.max_batch_size:
        out.append(f"privacy.min-batch-size ({pr.min_batch_size}) exceeds compute.max-batch-size "
                   f"({p.compute.max_batch_size})")
    for where, names, allowed in (("evaluation.metrics", p.evaluation.metrics, EVAL_METRIC_CHOICES),
                                  ("reply.train-metrics", p.reply.train_metrics, TRAIN_METRIC_CHOICES)):
        out += [f"{where}: unknown metric {n!r} (one of {', '.join(allowed)})" for n in names if n not in allowed]
    if p.evaluation.round_to < 0 or p.evaluation.noise < 0:
        out.append("evaluation.round-to and evaluation.noise must be >= 0")
    if p.reply.errors not in ERROR_DETAIL:
        out.append(f"reply.errors: {p.reply.errors!r} is not one of {', '.join(ERROR_DETAIL)}")
    out += [f"bases.{k}: {v!r} is not a fingerprint (sha256:<64 hex>; `fedlora policy fingerprint BASE`)"
            for k, v in p.bases.items() if not _is_fingerprint(v)]
    return out


def _is_fingerprint(v: str) -> bool:
    head, _, hexes = v.partition(":")
    return head == "sha256" and len(hexes) == 64 and all(c in "0123456789abcdef" for c in hexes)


_CACHE: dict[tuple, TenantPolicy] = {}


def load_policy(path: str | Path) -> TenantPolicy:
    """The policy in ``path`` (cached per file, size and modification time)."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError as err:
        raise PolicyError(f"tenant policy {path}: {err.strerror or err}; write one with `fedlora policy init "
                          f"{path}`") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(f"{path}: not valid TOML: {err}") from None
        _CACHE.clear()
        _CACHE[key] = parse_policy(doc, source=str(path))
    return _CACHE[key]


def data_problems(policy: TenantPolicy, num_records: int) -> list[str]:
    """What the policy cannot promise for a data set of ``num_records`` training records."""
    out = []
    if policy.privacy.delta * num_records > 1:
        out.append(f"privacy.delta {policy.privacy.delta:g} exceeds 1 / {num_records} training records "
                   f"({1 / num_records:.3g}): a delta that large allows releasing a record outright")
    if num_records < policy.privacy.min_batch_size:
        out.append(f"the data has {num_records} records, fewer than privacy.min-batch-size "
                   f"{policy.privacy.min_batch_size}")
    return out


def default_text(*, bases: dict[str, str] | None = None) -> str:
    """The commented policy ``fedlora policy init`` writes: every key with its default and meaning."""
    lines = ["# fedlora tenant policy: this node's own privacy line. The server's run config cannot",
             "# override it: a task that breaks it is declined before any work, with a reason code",
             "# the server records; the whole request goes to this node's log.",
             "# Check it with `fedlora policy check FILE --data train.jsonl`.", ""]
    default = TenantPolicy()
    for name in _SECTIONS:
        lines.append(f"[{name}]")
        for f in fields(_SECTIONS[name]):
            lines += [f"# {f.metadata['help']}", f"{f.name.replace('_', '-')} = {_toml(getattr(getattr(default, name), f.name))}"]
        lines.append("")
    lines += ["[bases]", "# model.base values this node loads, each pinned by its fingerprint",
              "# (`fedlora policy fingerprint BASE`). An empty table accepts any base."]
    lines += [f"{_toml(k)} = {_toml(v)}" for k, v in (bases or {}).items()]
    return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "[" + ", ".join(json.dumps(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v) if isinstance(v, str) else str(v)

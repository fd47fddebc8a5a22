"""A tenant's side of a round, in plain functions (no Flower imports).

The base model is loaded once per process and reused across rounds and messages; the
tenant's data once per process too. A round sets the global adapter, trains locally with
``fedlora.client.train.train`` and returns only the LoRA **delta** (local - global).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from fedlora.common import messages as keys
from fedlora.common.adapter import get_state, set_state, subtract
from fedlora.common.config import Config
from fedlora.common.data import Example, Tokenized, holdout_for, read_examples, tenant_paths, tokenize_examples
from fedlora.common.evaluate import evaluate
from fedlora.common.templates import PromptFormat, make_format
from fedlora.common.model import Loaded, load_model, set_threads


class TenantConfigError(ValueError):
    """The node config does not say where this tenant's data is."""


@dataclass(frozen=True)
class Tenant:
    tenant_id: int
    train_path: Path
    holdout_path: Path | None
    # Where the node keeps state that outlives runs (the privacy ledger): node config
    # ``state-dir``, else ``.fedlora-state/`` beside the training file.
    state_dir: Path | None = None
    # The tenant's own LoRA rank (federation.lora-rule = svd): node config ``lora-rank``, in
    # simulation ``simulation.tenant-ranks``; None: adapter.r.
    rank: int | None = None
    # Where the tenant's privacy ledgers live, one per data digest (node config ``ledger-dir``,
    # set by ``fedlora deploy supernode``); None: ``privacy_ledger.json`` in the state directory.
    ledger_dir: Path | None = None


def _state_dir(node_config: Mapping[str, object], train: Path) -> Path:
    from fedlora.client.ledger import STATE_DIR_NAME

    return Path(str(node_config["state-dir"])) if "state-dir" in node_config else train.parent / STATE_DIR_NAME


@dataclass
class TenantData:
    tenant: Tenant
    train: list[Example]
    holdout: list[Example]
    tokenized: Tokenized
    template: PromptFormat | None = None  # data.template for this base (None: auto)


def tenant_from_node_config(node_config: Mapping[str, object], cfg: Config) -> Tenant:
    """Deployment: ``data-path`` (and optional ``holdout-path``, ``tenant-id``, ``lora-rank``);
    simulation: ``partition-id`` inside ``data.dir``, or with ``data.dir`` empty (a bare
    ``flwr run``) the seeded synthetic tenant of that index (:func:`synthetic_tenant`)."""
    if "data-path" in node_config:
        train = Path(str(node_config["data-path"]))
        holdout = Path(str(node_config["holdout-path"])) if "holdout-path" in node_config else holdout_for(train)
        ledger_dir = Path(str(node_config["ledger-dir"])) if "ledger-dir" in node_config else None
        return Tenant(int(node_config.get("tenant-id", 0)), train, holdout if holdout.is_file() else None,
                      _state_dir(node_config, train), tenant_rank(node_config, cfg), ledger_dir)
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])  # type: ignore[arg-type]
        train, holdout = tenant_paths(cfg.data.dir, pid) if cfg.data.dir else synthetic_tenant(pid, cfg)
        ledger_dir = Path(cfg.simulation.ledger_dir) / f"tenant_{pid:03d}" if cfg.simulation.ledger_dir else None
        return Tenant(pid, train, holdout, _state_dir(node_config, train), tenant_rank(node_config, cfg, partition=pid),
                      ledger_dir)
    raise TenantConfigError("node config has neither data-path (deployment) nor partition-id (simulation); "
                            "start the SuperNode with --node-config 'data-path=\"/path/train.jsonl\"'")


def synthetic_tenant(partition_id: int, cfg: Config) -> tuple[Path, Path]:
    """(train, holdout) of simulated tenant ``partition_id`` when ``data.dir`` is empty (a bare
    ``flwr run``): the seeded files ``fedlora simulate`` writes for that tenant with the same
    ``data.*`` values. They come from the simulation side (``fedlora.simulations.synthetic.tenant_files``),
    found through the ``fedlora.tenant_data`` entry point ``synthetic``, so the client never imports it."""
    from importlib.metadata import entry_points

    found = entry_points(group="fedlora.tenant_data", name="synthetic")
    if not found:
        raise TenantConfigError("data.dir is empty and this installation has no synthetic tenants (entry point "
                                "fedlora.tenant_data:synthetic); set data.dir to the tenants' data directory")
    return next(iter(found)).load()(partition_id, cfg.data)


def tenant_rank(node_config: Mapping[str, object], cfg: Config, *, partition: int | None = None) -> int | None:
    """The tenant's LoRA rank: node config ``lora-rank``, else (simulation) its entry of
    ``simulation.tenant-ranks``; None: adapter.r. Only the svd rule federates mixed ranks."""
    where, value = "node config lora-rank", node_config.get("lora-rank")
    if value is None and partition is not None and cfg.simulation.tenant_ranks:
        from fedlora.common.lora import parse_ranks

        where, ranks = f"simulation.tenant-ranks (tenant {partition})", parse_ranks(cfg.simulation.tenant_ranks)
        if partition >= len(ranks):
            raise TenantConfigError(f"simulation.tenant-ranks names {len(ranks)} rank(s); tenant {partition} has none")
        value = ranks[partition]
    if value is None:
        return None
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise TenantConfigError(f"{where} = {value!r}: expected a positive integer LoRA rank")
    rank = int(str(value).strip())
    if cfg.federation.lora_rule != "svd":
        raise TenantConfigError(f"{where} = {rank}: a tenant of its own LoRA rank needs federation.lora-rule = svd "
                                f"(this run uses {cfg.federation.lora_rule!r}); remove lora-rank from the node "
                                "config or run with the svd rule")
    if not 1 <= rank <= cfg.adapter.r:
        raise TenantConfigError(f"{where} = {rank}: outside 1..{cfg.adapter.r} (adapter.r, the global rank)")
    return rank


_LEDGERS: dict[Path, "PrivacyLedger"] = {}


def ledger_for(tenant: Tenant) -> "PrivacyLedger":
    """The tenant's privacy ledger, one object per file in this process (its lock is re-entrant
    in that object: the policy's evaluation count and a round's budget check can nest)."""
    from fedlora.client.ledger import PrivacyLedger

    state_dir = tenant.state_dir or _state_dir({}, tenant.train_path)
    ledger = PrivacyLedger.for_data(tenant.ledger_dir, tenant.train_path) if tenant.ledger_dir else \
        PrivacyLedger(state_dir)
    return _LEDGERS.setdefault(ledger.path, ledger)


def node_state_dir(context) -> Path:
    """The node's state directory, from a Flower context (deployment: ``state-dir`` or beside
    ``data-path``; simulation: beside the tenant's files)."""
    from fedlora.common.config import parse_config

    return tenant_from_node_config(context.node_config, parse_config(context.run_config)).state_dir or Path(".")


_MODELS: dict[tuple, Loaded] = {}
_DATA: dict[tuple, TenantData] = {}


def session(cfg: Config) -> Loaded:
    """The process's base model with one adapter slot, loaded once."""
    key = (cfg.model, cfg.adapter, cfg.train.seed)
    set_threads(cfg.train.threads)  # every call: a cached model must not keep an earlier run's thread count
    if key not in _MODELS:
        _MODELS.clear()
        _DATA.clear()  # tokenized for the old base; a long-lived worker must not keep every run's data
        _MODELS[key] = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed)
    return _MODELS[key]


def tenant_data(tenant: Tenant, cfg: Config, tokenizer) -> TenantData:
    key = (tenant, cfg.data, cfg.model.base)
    if key not in _DATA:
        template = make_format(cfg.data, tokenizer)
        train = read_examples(tenant.train_path, fmt=cfg.data.format)
        holdout = read_examples(tenant.holdout_path, fmt=cfg.data.format) if tenant.holdout_path else []
        tok = tokenize_examples(train, tokenizer, max_length=cfg.data.max_length, template=template)
        _DATA[key] = TenantData(tenant, train, holdout, tok, template)
    return _DATA[key]


def round_seed(base_seed: int, tenant_id: int, server_round: int) -> int:
    return (base_seed * 1_000_003 + tenant_id * 10_007 + server_round) % (2**31 - 1)


def schedule_window(cfg: Config, server_round: int) -> tuple[int, int] | None:
    """This round's window of the tenant's LR schedule (see ``fedlora.client.train.make_schedule``)."""
    if cfg.train.schedule_span == "round":
        return None
    steps, rounds = cfg.train.local_steps, cfg.federation.rounds
    return (min(max(server_round, 1), rounds) - 1) * steps, rounds * steps


def train_round(loaded: Loaded, data: TenantData, global_state: Mapping[str, np.ndarray], cfg: Config, *,
                server_round: int, seed: int, progress: bool = False, run: str | None = None, limits=None):
    """One tenant round: returns (delta, metrics) — the delta holds only adapter tensors.

    The run's LoRA rule (``fedlora.client.lora_rules``) says which factors train and which deltas are
    sent: ffa freezes A and sends B; a lower-rank svd tenant trains and sends its first
    ``rank`` components. With ``train.prox-mu > 0`` local training is pulled toward the
    adapter the tenant started from (FedProx).
    The privacy mechanism may decline (``fedlora.client.ledger.BudgetExhausted``) before any
    training, and accounts for the update (writes the ledger) before it is returned; the ledger's
    lock is held from that check through that record. ``limits`` (the tenant policy's) replace
    the run's delta and budgets; ``run`` is the Flower run the spend is recorded under."""
    from fedlora.client.privacy import make_client_privacy

    ledger = ledger_for(data.tenant)
    with ledger.locked():
        privacy = make_client_privacy(cfg, ledger=ledger, num_examples=len(data.tokenized), run=run, limits=limits)
        privacy.before_round()
        return _train_and_commit(loaded, data, global_state, cfg, privacy, server_round=server_round, seed=seed,
                                 progress=progress, run=run)


def _train_and_commit(loaded, data, global_state, cfg, privacy, *, server_round, seed, progress, run):
    from fedlora.client.lora_rules import make_tenant_rule
    from fedlora.client.prox import make_proximal
    from fedlora.client.train import train

    rule = make_tenant_rule(cfg, rank=data.tenant.rank)
    start = rule.start(global_state)
    set_state(loaded.model, start)
    with rule.training(loaded.model) as after_step:
        try:
            result = train(loaded.model, data.tokenized, cfg.train, pad_id=loaded.tokenizer.pad_token_id,
                           device=loaded.device, seed=round_seed(seed, data.tenant.tenant_id, server_round),
                           progress=progress, desc=f"tenant {data.tenant.tenant_id} round {server_round}",
                           privacy=privacy, schedule_window=schedule_window(cfg, server_round),
                           proximal=make_proximal(cfg.train.prox_mu), after_step=after_step)
        finally:
            privacy.after_train()  # the process-cached model leaves unwrapped even after an error
    delta = privacy.finalize_delta(rule.reply(subtract(get_state(loaded.model), start)))
    epsilon = privacy.commit(round=server_round, tenant=data.tenant.tenant_id, examples=len(data.train),
                             **({"run": run} if run is not None and privacy.name != "local" else {}))
    metrics = privacy.public_metrics({
        keys.NUM_EXAMPLES: len(data.train),
        keys.TENANT: data.tenant.tenant_id,
        "train-loss": result.loss,
        "train-first-loss": result.first_loss,
        "train-steps": result.steps,
        "train-tokens": result.tokens,
        "train-seconds": result.seconds,
        "truncated": data.tokenized.truncated,
        keys.DP_EPSILON: epsilon,
    })
    return delta, metrics


def evaluate_round(loaded: Loaded, data: TenantData, global_state: Mapping[str, np.ndarray],
                   cfg: Config) -> dict[str, float]:
    if not data.holdout:
        raise TenantConfigError(f"tenant {data.tenant.tenant_id} has no holdout file "
                                f"(looked for {holdout_for(data.tenant.train_path)}); evaluation needs one")
    start = time.perf_counter()
    set_state(loaded.model, global_state)
    m = evaluate(loaded.model, loaded.tokenizer, data.holdout, cfg.eval, max_length=cfg.data.max_length,
                 device=loaded.device, template=data.template or make_format(cfg.data, loaded.tokenizer))
    return {
        keys.NUM_EXAMPLES: m.n,
        keys.TENANT: data.tenant.tenant_id,
        "eval-exact-match": m.exact_match,
        "eval-json-valid": m.json_valid,
        "eval-loss": m.loss,
        "eval-seconds": time.perf_counter() - start,
    }

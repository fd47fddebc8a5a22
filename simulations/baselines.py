"""The comparison every report carries: untuned base | each tenant's local-only adapter |
the federated adapter | a pooled (all data centralised) adapter, with the same budget.

Baselines use the same training function as the tenants (``fedlora.client.train.train``) and the
same evaluation function (``fedlora.common.evaluate``). Budgets: a local-only adapter takes the
steps its tenant took in the federation (rounds x local steps); the pooled adapter sees
the federation's examples (every tenant-round's local steps x batch), either in the global
adapter's number of steps with one accumulated micro-batch per tenant of a round
(``run.pooled-budget = "rounds"``) or at the tenants' batch size in as many more steps
(``"examples"``). See :func:`pooled_budget`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from fedlora.client.train import train
from fedlora.common.adapter import get_state, load_adapter_file, set_state
from fedlora.common.config import Config
from fedlora.common.data import Example, read_examples, read_texts, tenant_paths, tokenize_examples
from fedlora.common.evaluate import evaluate, probe_loss
from fedlora.common.templates import make_format
from fedlora.common.model import Loaded, load_model


@dataclass
class TenantSets:
    train: dict[int, list[Example]]
    holdout: dict[int, list[Example]]
    probe: list[str]


def load_sets(cfg: Config, data_dir: Path, tenants: list[int]) -> TenantSets:
    train, holdout = {}, {}
    for t in tenants:
        tr, ho = tenant_paths(data_dir, t)
        train[t] = read_examples(tr, fmt=cfg.data.format)
        holdout[t] = read_examples(ho, fmt=cfg.data.format)
    return TenantSets(train, holdout, read_texts(data_dir / "probe.jsonl")[: cfg.eval.probe_size])


@dataclass(frozen=True)
class PooledBudget:
    steps: int       # optimizer steps
    accumulate: int  # micro-batches (of train.batch-size) per step, times train.grad-accum

    def describe(self, batch_size: int) -> str:
        return (f"{self.steps} steps x {self.accumulate} micro-batch(es) of {batch_size} "
                f"= {self.steps * self.accumulate * batch_size} examples")


def pooled_budget(cfg: Config, *, rounds_done: int, total_tenant_rounds: int) -> PooledBudget:
    """The pooled baseline's budget: always the federation's examples (every finished
    tenant-round's local steps x batch); ``run.pooled-budget`` picks how they are stepped."""
    steps = cfg.train.local_steps
    if cfg.run.pooled_budget == "examples" or rounds_done == 0:
        return PooledBudget(max(1, total_tenant_rounds) * steps, 1)
    per_round = max(1, round(total_tenant_rounds / rounds_done))
    return PooledBudget(rounds_done * steps, per_round)


def _train_from(loaded: Loaded, init: Mapping[str, np.ndarray], examples: list[Example], cfg: Config, *,
                steps: int, seed: int, desc: str, accumulate: int = 1):
    set_state(loaded.model, init)
    tok = tokenize_examples(examples, loaded.tokenizer, max_length=cfg.data.max_length,
                            template=make_format(cfg.data, loaded.tokenizer))
    tcfg = replace(cfg.train, grad_accum=cfg.train.grad_accum * accumulate)
    metrics = train(loaded.model, tok, tcfg, pad_id=loaded.tokenizer.pad_token_id, device=loaded.device,
                    steps=steps, seed=seed, progress=True, desc=desc)
    return get_state(loaded.model), metrics


def train_baselines(loaded: Loaded, init: Mapping[str, np.ndarray], sets: TenantSets, cfg: Config, *,
                    steps_per_tenant: int, pooled: PooledBudget) -> "OrderedDict[str, OrderedDict]":
    """Local-only adapters (one per tenant) and the pooled adapter."""
    out: OrderedDict = OrderedDict()
    for t, rows in sets.train.items():
        out[f"local-only {t}"], _ = _train_from(loaded, init, rows, cfg, steps=steps_per_tenant,
                                                seed=cfg.train.seed + 101 * (t + 1), desc=f"local-only tenant {t}")
    rows = [ex for tenant_rows in sets.train.values() for ex in tenant_rows]
    out["pooled"], _ = _train_from(loaded, init, rows, cfg, steps=pooled.steps, accumulate=pooled.accumulate,
                                   seed=cfg.train.seed + 7, desc="pooled")
    return out


def evaluate_table(loaded: Loaded, models: Mapping[str, Mapping[str, np.ndarray]], sets: TenantSets,
                   cfg: Config, *, template: str | None = None) -> list[dict]:
    """Every model on every tenant's holdout and on the forgetting probe, through the run's
    prompt template (or ``template``: ``alpaca`` / ``chat``)."""
    fmt = make_format(template or cfg.data, loaded.tokenizer)
    rows = []
    for name, state in tqdm(list(models.items()), desc="evaluate models", leave=False):
        set_state(loaded.model, state)
        row: dict = {"model": name, "per_tenant": {}}
        for t, holdout in sets.holdout.items():
            m = evaluate(loaded.model, loaded.tokenizer, holdout, cfg.eval, max_length=cfg.data.max_length,
                         device=loaded.device, template=fmt)
            row["per_tenant"][str(t)] = m.as_dict()
        per = row["per_tenant"].values()
        row["mean_exact_match"] = float(np.mean([m["exact_match"] for m in per]))
        row["mean_json_valid"] = float(np.mean([m["json_valid"] for m in per]))
        row["mean_loss"] = float(np.mean([m["loss"] for m in per]))
        row["probe_loss"] = probe_loss(loaded.model, loaded.tokenizer, sets.probe, batch_size=cfg.eval.batch_size,
                                       max_length=cfg.data.max_length, device=loaded.device)
        rows.append(row)
    return rows


def compare(cfg: Config, run_dir: Path, data_dir: Path, tenants: list[int], *, rounds_done: int,
            total_tenant_rounds: int, with_baselines: bool) -> list[dict]:
    """Train the baselines and evaluate all models; returns the comparison rows."""
    loaded = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed)
    init = load_adapter_file(run_dir / "checkpoints" / "round_000")
    sets = load_sets(cfg, data_dir, tenants)
    models: OrderedDict = OrderedDict([("untuned base", init)])
    baselines = OrderedDict()
    budget = pooled_budget(cfg, rounds_done=rounds_done, total_tenant_rounds=total_tenant_rounds)
    if with_baselines:
        baselines = train_baselines(loaded, init, sets, cfg, steps_per_tenant=rounds_done * cfg.train.local_steps,
                                    pooled=budget)
    models.update((k, v) for k, v in baselines.items() if k != "pooled")
    models["federated"] = load_adapter_file(run_dir / "adapter")
    if "pooled" in baselines:
        models["pooled"] = baselines["pooled"]
    rows = evaluate_table(loaded, models, sets, cfg)
    if make_format(cfg.data, loaded.tokenizer).name != "alpaca":  # an instruct base: also zero-shot via Alpaca
        alpaca = evaluate_table(loaded, {"untuned base (Alpaca template)": init}, sets, cfg, template="alpaca")
        rows[1:1] = alpaca
    for row in rows:
        if row["model"] == "pooled":
            row["budget"] = f"{budget.describe(cfg.train.batch_size)} (run.pooled-budget = {cfg.run.pooled_budget})"
        elif row["model"].startswith("local-only"):
            row["budget"] = f"{rounds_done * cfg.train.local_steps} steps x {cfg.train.batch_size} examples"
    return rows

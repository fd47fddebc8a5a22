"""Benchmark: orchestration overhead of a federated run, and bytes on the wire.

    python -m fedlora.simulations.bench.federation [--scenario default] [--out runs/bench]

1. Runs the scenario through Flower's simulation engine (``fedlora simulate`` without
   baselines) and takes the federated wall time (SuperLink start to final adapter).
2. Runs the *same* local training steps and per-round evaluations sequentially in one
   process with the same functions (no Flower): the baseline.
3. Reports federated / sequential wall time (target <= 1.5x) and the uplink bytes per
   tenant-round over the full model's bytes.
4. Reports the steady-state ratio too: the median seconds of a round from round 2 on, in
   each arm (Flower's and Ray's start-up and the first round's actor warm-up are left out,
   as is the sequential arm's model load). The whole-run ratio moves with start-up when
   rounds are short; this one measures what each further round costs.

The two arms alternate run by run, ``--repeats`` times, the order reversed every other
repeat (the sequential arm reads the tenant files the first federated run wrote); the
ratio is the median of each repeat's federated / sequential, reported with its spread and
the load average at start and end. ``--warmup`` pairs (default 1) run first and are not
counted: a fresh process's first run of each arm was 10-20 % slower than the later ones,
by different amounts in the two arms. ``--set`` shrinks the scenario for a quick run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from fedlora.common.offline import quiet_and_offline
from fedlora.common.records import read_rounds, read_summary
from fedlora.simulations.bench.timing import interleave, load_line, loadavg, ratio_summary


def steady_seconds(per_round: list[float]) -> float:
    """The median seconds of a round from round 2 on (round 1 alone if there is no other)."""
    return statistics.median(per_round[1:] or per_round)


def sequential(cfg, data_dir: Path, rounds: int, per_round: list[float] | None = None) -> float:
    """The federation's work without Flower: same functions, same steps, one process.
    ``per_round`` collects each round's seconds (train, aggregate, evaluate)."""
    from fedlora.client.task import Tenant, TenantData, evaluate_round, train_round
    from fedlora.common.adapter import get_state
    from fedlora.common.data import read_examples, tenant_paths, tokenize_examples
    from fedlora.common.model import load_model
    from fedlora.server.aggregation import apply_mean, validate_update, weight_rule, weighted_sum
    from fedlora.common.messages import TRAIN_METRICS

    start = time.perf_counter()
    loaded = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed)
    glob = get_state(loaded.model)
    tenants = []
    for t in range(cfg.simulation.tenants):
        tr, ho = tenant_paths(data_dir, t)
        train = read_examples(tr)
        tenants.append(TenantData(Tenant(t, tr, ho), train, read_examples(ho),
                                  tokenize_examples(train, loaded.tokenizer, max_length=cfg.data.max_length)))
    weight_of = weight_rule(cfg.federation.weighting, max_weight=cfg.federation.max_weight)
    for r in range(1, rounds + 1):
        t_round = time.perf_counter()
        updates = []
        for data in tenants:
            delta, metrics = train_round(loaded, data, glob, cfg, server_round=r, seed=cfg.train.seed)
            updates.append(validate_update(delta, metrics, reference=glob, expected_metrics=TRAIN_METRICS,
                                           max_examples=cfg.federation.max_examples,
                                           weight_of=weight_of))
        glob = apply_mean(glob, weighted_sum(updates), server_lr=cfg.federation.server_lr)
        for data in tenants:
            evaluate_round(loaded, data, glob, cfg)
        if per_round is not None:
            per_round.append(time.perf_counter() - t_round)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    from fedlora.simulations.cli.simulate import simulate
    from fedlora.simulations.scenario import parse_overrides, resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each arm (median reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="runs of each arm first that are not counted (cold caches, Ray's first workers)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)
    load0 = loadavg()
    runs: list[tuple[Path, object]] = []
    steady: dict[str, list[float]] = {"federated": [], "sequential": []}  # per repeat, run order

    def federated() -> float:
        run_dir = (args.out / "federation_run" / f"repeat{len(runs)}").resolve()
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cfg = resolve(args.scenario, {**parse_overrides(args.set), "run.baselines": False, "dpo.enabled": False,
                                      "publish.enabled": False}, str(run_dir))
        simulate(cfg)
        runs.append((run_dir, cfg))
        steady["federated"].append(steady_seconds([r.seconds for r in read_rounds(run_dir)]))
        return json.loads((run_dir / "timings.json").read_text())["federated_seconds"]

    def sequential_run() -> float:
        if not runs:  # the sequential arm needs the tenant files a federated run writes
            federated()
            steady["federated"].clear()  # that run is the data's writer, not a repeat
        run_dir, cfg = runs[0]
        per_round: list[float] = []
        seconds = sequential(cfg, run_dir / "data", read_summary(run_dir).rounds, per_round)
        steady["sequential"].append(steady_seconds(per_round))
        return seconds

    t = interleave({"federated": federated, "sequential": sequential_run}, args.repeats, warmup=args.warmup)
    steady = {arm: s[-args.repeats:] for arm, s in steady.items()}  # the warm-up's rounds are not counted
    load1 = loadavg()
    ratio = ratio_summary(t["federated"], t["sequential"])
    steady_ratio = ratio_summary(steady["federated"], steady["sequential"])
    run_dir, cfg = runs[0]
    fed = read_summary(run_dir)
    tenant_rounds = sum(len(r.finished) for r in read_rounds(run_dir))
    from fedlora.common.model import embedded_base_dir, resolve_base

    base_dir = Path(resolve_base(cfg.model.base)) if cfg.model.base != "embedded" else embedded_base_dir()
    full_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    summary = {
        "federated_seconds": statistics.median(t["federated"]),
        "sequential_seconds": statistics.median(t["sequential"]),
        "overhead_ratio": ratio["median"], "ratio_spread": ratio, "repeats": args.repeats,
        "warmup": args.warmup,
        "runs": t, "steady_round_seconds": steady, "steady_ratio": steady_ratio["median"],
        "steady_ratio_spread": steady_ratio,
        "uplink_bytes_per_tenant_round": fed.bytes_up / tenant_rounds,
        "full_model_bytes": full_bytes,
        "uplink_over_full_model": fed.bytes_up / tenant_rounds / full_bytes,
        "rounds": fed.rounds, "tenant_rounds": tenant_rounds, "load_start": load0, "load_end": load1,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "federation.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"federated / sequential wall time: {summary['overhead_ratio']:.2f}x (target <= 1.5x; per repeat "
          f"{ratio['min']:.2f}-{ratio['max']:.2f}x, spread {ratio['spread_pct']:.1f} %, {args.repeats} repeats after "
          f"{args.warmup} warm-up); "
          f"uplink per tenant-round {summary['uplink_bytes_per_tenant_round'] / 1e6:.3f} MB = "
          f"{100 * summary['uplink_over_full_model']:.2f} % of the full model")
    print(f"steady state (median round from round 2 on): {steady_ratio['median']:.2f}x (per repeat "
          f"{steady_ratio['min']:.2f}-{steady_ratio['max']:.2f}x, spread {steady_ratio['spread_pct']:.1f} %)")
    print(load_line(load0, load1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

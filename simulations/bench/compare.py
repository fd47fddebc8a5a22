"""Benchmark: aggregation rules, server optimizers and delta encodings side by side.

    python -m fedlora.simulations.bench.compare [--scenarios default,non_iid] [--arms fedavg,ffa,int8]
                                        [--arm NAME:KEY=VALUE,KEY=VALUE] [--set KEY=VALUE] [--out runs/compare]

For every scenario, the ``fedavg`` arm runs first with the baselines (it trains the pooled
adapter, all data centralised, on the federation's budget); every other arm runs the same
scenario, seed and tenant data with its own settings and without baselines. Each arm's
federated adapter is evaluated on every tenant's holdout as in ``fedlora simulate``.

The table (``compare.md``, also printed; ``compare.json`` holds every figure):

* federated mean exact match over the tenants' holdouts, and its ratio to the pooled adapter's;
* the worst tenant's exact match (client drift shows there first);
* uplink MB per tenant-round, from the round records (what the server received);
* server seconds per round: aggregation, central noise and the server optimizer's step, from
  the round records (validation of the replies is the transport's and not included).

This is a quality table, not a timing ratio: arms are not interleaved; each is one run.
``--arm`` adds or redefines an arm, e.g. ``--arm fedadam-3e-2:federation.server-optimizer=fedadam,
federation.server-lr=0.03``. ``--set`` applies to every arm (to shrink a scenario for a quick look).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.common.offline import quiet_and_offline
from fedlora.common.records import read_rounds, read_summary
from fedlora.simulations.bench.timing import load_line, loadavg

# The arms of the README's table. Values as run-config strings, as on the command line.
ARMS: dict[str, dict[str, str]] = {
    "fedavg": {},
    "fedavg-lr2": {"federation.server-lr": "2.0"},
    "fedexp": {"federation.server-optimizer": "fedexp"},
    "fedavgm": {"federation.server-optimizer": "fedavgm", "federation.server-beta1": "0.5"},
    "fedadam": {"federation.server-optimizer": "fedadam", "federation.server-lr": "0.01"},
    "fedprox": {"train.prox-mu": "5.0"},
    "ffa": {"federation.lora-rule": "ffa"},
    "svd": {"federation.lora-rule": "svd"},
    "bf16": {"federation.delta-encoding": "bf16"},
    "int8": {"federation.delta-encoding": "int8"},
}
DEFAULT_ARMS = "fedavg,fedexp,fedavg-lr2,fedavgm,fedadam,fedprox,ffa,svd,bf16,int8"


@dataclass
class ArmResult:
    scenario: str
    arm: str
    settings: dict[str, str]
    mean_exact_match: float
    worst_exact_match: float
    uplink_mb_per_tenant_round: float
    server_seconds_per_round: float
    wall_seconds: float
    pooled_exact_match: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ratio_to_pooled(self) -> float | None:
        return self.mean_exact_match / self.pooled_exact_match if self.pooled_exact_match else None


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` (or ``NAME:`` for the scenario as it is)."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--arm {text!r}: expected NAME:KEY=VALUE,KEY=VALUE")
    settings = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--arm {text!r}: {item!r} is not KEY=VALUE")
        settings[key.strip()] = value.strip()
    return name, settings


def read_arm(run_dir: Path) -> dict:
    """The figures of one finished run, from its records and comparison.json."""
    rows = {r["model"]: r for r in json.loads((run_dir / "comparison.json").read_text())}
    fed = rows["federated"]
    rounds = read_rounds(run_dir)
    summary = read_summary(run_dir)
    tenant_rounds = sum(len(r.finished) for r in rounds) or 1
    server = [r.aggregation.get("server_seconds", 0.0) for r in rounds if r.aggregated]
    per_tenant = [m["exact_match"] for m in fed["per_tenant"].values()]
    return {"mean": fed["mean_exact_match"], "worst": min(per_tenant),
            "pooled": rows.get("pooled", {}).get("mean_exact_match"),
            "uplink_mb": summary.bytes_up / tenant_rounds / 1e6,
            "server_s": statistics.median(server) if server else 0.0,
            "svd_error": [r.aggregation["svd_relative_error_max"] for r in rounds
                          if "svd_relative_error_max" in r.aggregation]}


def table(results: list[ArmResult]) -> str:
    lines = ["| scenario | arm | federated EM | / pooled | worst tenant | uplink MB / tenant-round | "
             "server s / round |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r.ratio_to_pooled:.3f}" if r.ratio_to_pooled is not None else "n/a"
        lines.append(f"| {r.scenario} | {r.arm} | {100 * r.mean_exact_match:.1f} % | {ratio} | "
                     f"{100 * r.worst_exact_match:.1f} % | {r.uplink_mb_per_tenant_round:.3f} | "
                     f"{r.server_seconds_per_round:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    from fedlora.simulations.cli.simulate import simulate
    from fedlora.simulations.scenario import parse_overrides, resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--scenarios", default="default,non_iid", help="comma-separated scenario names")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated arm names (fedavg always runs first)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="define or redefine an arm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every arm")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = p.parse_args(argv)
    arms = dict(ARMS)
    for text in args.arm:
        name, settings = parse_arm(text)
        arms[name] = settings
    names = ["fedavg", *[a for a in args.arms.split(",") if a and a != "fedavg"]]
    unknown = [a for a in names if a not in arms]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {sorted(arms)} (or define one with --arm)")
    common = parse_overrides(args.set)
    load0 = loadavg()
    results: list[ArmResult] = []
    for scenario in filter(None, args.scenarios.split(",")):
        pooled = None
        for arm in names:
            run_dir = (args.out / scenario / arm).resolve()
            if run_dir.exists():
                shutil.rmtree(run_dir)
            overrides = {**common, **parse_overrides([f"{k}={v}" for k, v in arms[arm].items()]),
                         "run.baselines": arm == "fedavg", "dpo.enabled": False, "publish.enabled": False}
            cfg = resolve(scenario, overrides, str(run_dir))
            start = time.perf_counter()
            simulate(cfg)
            wall = time.perf_counter() - start
            got = read_arm(run_dir)
            pooled = got["pooled"] if arm == "fedavg" else pooled
            results.append(ArmResult(scenario, arm, arms[arm], got["mean"], got["worst"], got["uplink_mb"],
                                     got["server_s"], wall, pooled_exact_match=pooled,
                                     extra={"svd_relative_error_max": got["svd_error"]} if got["svd_error"] else {}))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    load1 = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    (args.out / "compare.md").write_text(text + "\n\n" + load_line(load0, load1) + "\n")
    (args.out / "compare.json").write_text(json.dumps(
        [{**r.__dict__, "ratio_to_pooled": r.ratio_to_pooled} for r in results], indent=2))
    print(text)
    print(load_line(load0, load1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

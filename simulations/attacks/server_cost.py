"""What the server's defences cost per round, as a ratio to plain FedAvg in the same run.

``python -m fedlora.simulations.attacks.server_cost`` times the server's work on one round's
individual updates (bounds, the direction screen, robust aggregator, audit, apply) for each setting, on random
updates shaped like the embedded model's adapter (about 120k floats) and a 17 MB one.
The arms alternate round by round; the median over the repeats and the spread (min-max
over median) are printed, with the load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import OrderedDict

import numpy as np

from fedlora.server.aggregation import FedAvg, Median, MultiKrum, TrimmedMean, Update, apply_mean
from fedlora.server.bounds import UpdateBounds, audit, screen_out
from fedlora.server.screen import DirectionScreen, sample

SCREEN = DirectionScreen()  # the default: drop, on 65,536 sampled coordinates

ARMS = {
    "fedavg, no bounds": (FedAvg(), UpdateBounds()),
    "fedavg + bounds (default)": (FedAvg(), UpdateBounds(norm_multiplier=3.0, weight_multiplier=2.0)),
    "median + bounds": (Median(), UpdateBounds(norm_multiplier=3.0, weight_multiplier=2.0)),
    "trimmed-mean + bounds": (TrimmedMean(beta=0.25), UpdateBounds(norm_multiplier=3.0, weight_multiplier=2.0)),
    "krum + bounds": (MultiKrum(f=1, m=0), UpdateBounds(norm_multiplier=3.0, weight_multiplier=2.0)),
}


def updates(n: int, floats: int, *, seed: int = 0) -> tuple[OrderedDict, list[Update]]:
    rng = np.random.default_rng(seed)
    shapes = [(8, floats // 16), (floats // 16, 8)]  # one LoRA A and B pair of the right size
    glob = OrderedDict((f"m{i}.lora_{'AB'[i % 2]}.weight", np.zeros(s, np.float32)) for i, s in enumerate(shapes))
    ups = [Update(delta=OrderedDict((k, rng.normal(0, 0.01, v.shape).astype(np.float32)) for k, v in glob.items()),
                  num_examples=1024, weight=1024.0, metrics={}, node=i) for i in range(n)]
    return glob, ups


def server_round(glob, ups, aggregator, bounds) -> None:
    """The strategy's work between collecting the replies and checkpointing."""
    bounded = bounds.apply(ups)
    view = sample(ups, coordinates=SCREEN.coordinates, key=b"bench", server_round=1)
    outliers = SCREEN.outliers(view)
    screen_out(bounded, outliers)
    summed, _ = aggregator.combine(bounded.kept)
    audit(ups, bounded, bounded.kept, summed.total, view=view, outliers=outliers)
    apply_mean(glob, summed, server_lr=1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedlora.simulations.attacks.server_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="rounds per arm (default 7)")
    ap.add_argument("--tenants", default="4,10", help="updates per round, comma-separated (default 4,10)")
    args = ap.parse_args(argv)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| adapter | tenants | setting | seconds per round (median) | spread | x fedavg, no bounds |")
    print("|---|---|---|---|---|---|")
    for label, floats in (("embedded (0.48 MB)", 120_000), ("17 MB", 17 * 2**20 // 4)):
        for n in (int(x) for x in args.tenants.split(",")):
            glob, ups = updates(n, floats)
            times: dict[str, list[float]] = {a: [] for a in ARMS}
            for _ in range(args.repeats):
                for arm, (aggregator, bounds) in ARMS.items():  # interleaved, round by round
                    t = time.perf_counter()
                    server_round(glob, ups, aggregator, bounds)
                    times[arm].append(time.perf_counter() - t)
            base = statistics.median(times["fedavg, no bounds"])
            for arm, ts in times.items():
                med = statistics.median(ts)
                print(f"| {label} | {n} | {arm} | {med:.4f} | {(max(ts) - min(ts)) / med:.2f} | {med / base:.2f} |")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

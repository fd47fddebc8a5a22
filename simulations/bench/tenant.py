"""Benchmark: one tenant's adapter on the embedded base — holdout exact match before and
after local training, and the CPU time the training took.

    python -m fedlora.simulations.bench.tenant [--tenant 0] [--steps 120] [--threads 2] [--set KEY=VALUE ...]

The tenant's synthetic train and holdout splits are generated with the run config's data
settings (default: 4096 train rows, 96 holdout rows); training is the same ``fedlora.client.train``
function the tenants' ClientApps call, for ``--steps`` optimizer steps (default: a tenant's
whole federated budget, rounds x local steps). CPU time is the process's user + system
time during training (all threads), wall time beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedlora.common.offline import quiet_and_offline


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenant", type=int, default=0, help="synthetic tenant id (default 0)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default: rounds x local steps)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run-config key (repeatable)")
    args = p.parse_args(argv)

    import torch

    from fedlora.client.train import train
    from fedlora.common.config import parse_config
    from fedlora.common.data import read_examples, tenant_paths, tokenize_examples
    from fedlora.common.evaluate import evaluate
    from fedlora.common.model import load_model
    from fedlora.simulations.scenario import parse_overrides
    from fedlora.simulations.synthetic import write_tenants

    torch.set_num_threads(args.threads)
    cfg = parse_config(parse_overrides(args.overrides))
    steps = args.steps or cfg.federation.rounds * cfg.train.local_steps
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-tenant-") as tmp:
        write_tenants(tmp, num_tenants=args.tenant + 1, train_size=cfg.data.train_size,
                      holdout_size=cfg.data.holdout_size, own_fraction=cfg.data.own_fraction,
                      preference_size=2, seed=cfg.data.seed, probe_size=2)
        train_path, holdout_path = tenant_paths(Path(tmp), args.tenant)
        loaded = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed)
        holdout = read_examples(holdout_path)
        data = tokenize_examples(read_examples(train_path), loaded.tokenizer, max_length=cfg.data.max_length)

        def exact_match() -> float:
            return evaluate(loaded.model, loaded.tokenizer, holdout, cfg.eval, max_length=cfg.data.max_length,
                            device=loaded.device).exact_match

        before = exact_match()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        train(loaded.model, data, cfg.train, pad_id=loaded.tokenizer.pad_token_id, device=loaded.device,
              seed=cfg.train.seed, steps=steps, progress=True, desc=f"tenant {args.tenant}")
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        after = exact_match()
    print(f"tenant {args.tenant}: {len(data)} train rows, {len(holdout)} holdout rows, {steps} steps "
          f"of batch {cfg.train.batch_size}")
    print(f"holdout exact match {100 * before:.1f} % -> {100 * after:.1f} % "
          f"({100 * (after - before):+.1f} points); training CPU time {cpu:.1f} s, wall {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

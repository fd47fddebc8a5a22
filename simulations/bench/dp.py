"""Benchmark: the DP-SGD step over the non-DP step, on the default model, in the same run.

    python -m fedlora.simulations.bench.dp [--steps 20] [--repeats 3] [--modes ew,hooks] [--out runs/bench]

Both arms use the one training function (``fedlora.client.train.train``) on the same synthetic
tenant, the default config (embedded base, LoRA r=8 on all linear layers, batch 16,
128 tokens); the DP arm adds ``fedlora.client.privacy.LocalDP`` (Opacus, Poisson sampling,
noise calibrated for the default target epsilon). Arms are interleaved ``--repeats``
times (the order reversed on every other repeat) so that machine load hits both alike;
each repeat's DP run is divided by the same repeat's non-DP run, and the median of those
ratios is reported with their spread and the load average at start and end (seconds
per step timed inside ``train``, after the Opacus wrapping). Target: <= 1.15x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fedlora.common.offline import quiet_and_offline
from fedlora.simulations.bench.timing import interleave, load_line, loadavg, ratio_summary


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    import torch

    from fedlora.client.privacy import LocalDP, NoPrivacy, noise_for_target, sample_rate_for
    from fedlora.client.train import train
    from fedlora.common.config import parse_config
    from fedlora.common.data import read_examples, tenant_paths, tokenize_examples
    from fedlora.common.model import load_model
    from fedlora.simulations.synthetic import write_tenants

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per arm")
    p.add_argument("--modes", default="ew,hooks", help="Opacus grad-sample modes to time")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fedlora.simulations.scenario import parse_overrides

    cfg = parse_config(parse_overrides(args.set))
    loaded = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tenants(Path(tmp), num_tenants=1, train_size=cfg.data.train_size, holdout_size=4, preference_size=4,
                      seed=cfg.data.seed)
        examples = read_examples(tenant_paths(tmp, 0)[0])
    data = tokenize_examples(examples, loaded.tokenizer, max_length=cfg.data.max_length)
    q = sample_rate_for(len(data), cfg.train.batch_size)
    sigma = noise_for_target(target_epsilon=cfg.privacy.target_epsilon, delta=cfg.privacy.delta, sample_rate=q,
                             steps=cfg.federation.rounds * cfg.train.local_steps)
    modes = [m for m in args.modes.split(",") if m]

    def arm(mode: str | None) -> float:
        privacy = NoPrivacy() if mode is None else LocalDP(
            noise_multiplier=sigma, max_grad_norm=cfg.privacy.max_grad_norm, sample_rate=q, delta=cfg.privacy.delta,
            planned_steps=args.steps, grad_sample_mode=mode)
        m = train(loaded.model, data, cfg.train, pad_id=loaded.tokenizer.pad_token_id, device=loaded.device,
                  steps=args.steps, progress=False, privacy=privacy)
        return m.seconds / m.steps

    arm(None)  # warm-up: allocator, kernels, Opacus import
    for mode in modes:
        arm(mode)
    load0 = loadavg()
    times = interleave({"no-dp": lambda: arm(None), **{m: (lambda m=m: arm(m)) for m in modes}}, args.repeats)
    load1 = loadavg()
    ratios = {m: ratio_summary(times[m], times["no-dp"]) for m in modes}
    summary = {
        "model": cfg.model.base, "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length,
        "noise_multiplier": sigma, "sample_rate": q, "threads": args.threads, "steps": args.steps,
        "repeats": args.repeats, "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
        "ratio": {m: ratios[m]["median"] for m in modes}, "ratio_spread": ratios,
        "load_start": load0, "load_end": load1,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    for m in modes:
        r = ratios[m]
        print(f"DP-SGD ({m}) step / non-DP step: {r['median']:.3f}x (target <= 1.15x; per-repeat "
              f"{r['min']:.3f}-{r['max']:.3f}x, spread {r['spread_pct']:.1f} %)")
    print(load_line(load0, load1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

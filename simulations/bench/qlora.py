"""Benchmark: QLoRA (4-bit NF4 base) step time and memory against fp32 LoRA, in one run.

    python -m fedlora.simulations.bench.qlora [--steps 30] [--batch-size 16] [--out runs/bench]

Both variants train the same adapter on the same batches of a synthetic tenant, both
loaded at once and stepped **alternately** (fp32 step, nf4 step, nf4 step, fp32 step, ...),
so a change of machine load lands on both alike. Reported: the median seconds per
optimizer step (after warm-up) of each, the median of the per-pair ratios QLoRA / LoRA and
their spread, the load average at start and end, the base model's weight memory
(``get_memory_footprint``) and the process's peak RSS growth while each variant loads and
runs its warm-up steps (one after the other, before the interleaved steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time
from pathlib import Path

from fedlora.common.offline import quiet_and_offline
from fedlora.simulations.bench.timing import load_line, loadavg, ratio_summary, spread

import torch


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def prepare(precision: str, steps: int, batch_size: int, warmup: int) -> dict:
    """Load one variant, run its warm-up steps; returns its step function and memory."""
    from fedlora.client.train import make_loader
    from fedlora.common.config import parse_config
    from fedlora.common.data import Example, tokenize_examples
    from fedlora.common.model import load_model
    from fedlora.simulations.synthetic import tenant_split

    cfg = parse_config({"model.precision": precision, "train.batch-size": batch_size})
    gc.collect()
    rss0 = _rss_mb()
    loaded = load_model(cfg.model, cfg.adapter)
    base_bytes = loaded.model.get_base_model().get_memory_footprint()
    rows = tenant_split(0, split="train", n=256, own_fraction=0.85, seed=0)
    data = tokenize_examples([Example.from_alpaca(r["instruction"], r["input"], r["output"]) for r in rows],
                             loaded.tokenizer, max_length=cfg.data.max_length)
    loader = make_loader(data, batch_size, loaded.tokenizer.pad_token_id, seed=0)
    batches = [b for _, b in zip(range(steps + warmup), iter(_cycle(loader)))]
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loaded.model.train()

    def step(b) -> float:
        t = time.perf_counter()
        opt.zero_grad()
        out = loaded.model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t

    peak = rss0
    for b in batches[:warmup]:
        step(b)
        peak = max(peak, _rss_mb())
    return {"precision": precision, "step": step, "batches": batches[warmup:], "base_weights_mb": base_bytes / 2**20,
            "rss_growth_mb": peak - rss0}


def _cycle(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="interleaved timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)
    import bitsandbytes  # noqa: F401  (imports first, so neither variant's RSS growth counts them)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    load0 = loadavg()
    lora, qlora = (prepare(prec, args.steps, args.batch_size, args.warmup) for prec in ("fp32", "nf4"))
    arms = {v["precision"]: v for v in (lora, qlora)}
    times: dict[str, list[float]] = {"fp32": [], "nf4": []}
    for i in range(args.steps):  # step by step, the order alternating
        for name in (("fp32", "nf4") if i % 2 == 0 else ("nf4", "fp32")):
            times[name].append(arms[name]["step"](arms[name]["batches"][i]))
    load1 = loadavg()
    results = [{"precision": v["precision"], "step_seconds": statistics.median(times[v["precision"]]),
                "step_seconds_spread": spread(times[v["precision"]]), "steps": args.steps,
                "base_weights_mb": v["base_weights_mb"], "rss_growth_mb": v["rss_growth_mb"]} for v in (lora, qlora)]
    ratio = ratio_summary(times["nf4"], times["fp32"])
    summary = {"results": results, "qlora_over_lora_step_time": ratio["median"], "ratio_spread": ratio,
               "qlora_over_lora_base_weights": qlora["base_weights_mb"] / lora["base_weights_mb"],
               "torch_threads": torch.get_num_threads(), "load_start": load0, "load_end": load1}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qlora.json").write_text(json.dumps(summary, indent=2))
    print(f"{'variant':10} {'s/step':>8} {'base MB':>9} {'RSS +MB':>9}")
    for r in results:
        print(f"{r['precision']:10} {r['step_seconds']:8.4f} {r['base_weights_mb']:9.2f} {r['rss_growth_mb']:9.1f}")
    print(f"QLoRA / LoRA step time: {summary['qlora_over_lora_step_time']:.3f}x (target <= 1.2x; per-pair ratios "
          f"{ratio['min']:.3f}-{ratio['max']:.3f}x over {args.steps} interleaved pairs); "
          f"base weights {summary['qlora_over_lora_base_weights']:.3f}x")
    print(load_line(load0, load1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: one LoRA step through fedlora's training function against a plain
transformers + PEFT step of the same model and batch, and peak memory with and without
gradient checkpointing.

    python -m fedlora.simulations.bench.real_step --base BASE_DIR [--batch-size 16] [--steps 2] [--repeats 3]

Arms (each repeat runs every arm once, in a fresh process, the order reversed on every other
repeat, so a change of load lands on all of them alike):

- ``plain``: ``AutoModelForCausalLM`` + ``peft.get_peft_model`` (same LoRA config), then
  ``model(input_ids, attention_mask=..., labels=...).loss.backward()`` and an AdamW step:
  full-vocabulary logits at every position, as transformers computes them.
- ``fedlora``: ``fedlora.client.train.train`` on the same batches (response-only output layer).
- ``fedlora-gc``: the same with ``train.gradient-checkpointing=true``.

Reported per arm: median seconds per optimizer step (after one warm-up step) and the spread
over repeats; throughput relative to ``plain``; the process's peak resident memory while
stepping above its resident memory after loading (``VmHWM`` reset through
``/proc/self/clear_refs``), median over repeats; the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("plain", "fedlora", "fedlora-gc")


def _status(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _batches(cfg, tokenizer, n: int, batch_size: int):
    from fedlora.client.train import make_loader
    from fedlora.common.data import Example, tokenize_examples
    from fedlora.common.templates import make_format
    from fedlora.simulations.synthetic import tenant_split

    rows = tenant_split(0, split="train", n=max(64, batch_size * n), own_fraction=0.85, seed=0)
    examples = [Example.from_alpaca(r["instruction"], r["input"], r["output"]) for r in rows]
    data = tokenize_examples(examples, tokenizer, max_length=cfg.data.max_length,
                             template=make_format(cfg.data, tokenizer))
    loader = make_loader(data, batch_size, tokenizer.pad_token_id, seed=0)
    return data, [b for _, b in zip(range(n), loader)]


def run_arm(arm: str, base: str, batch_size: int, steps: int, threads: int) -> dict:
    """One arm in this process: load, one warm-up step, ``steps`` timed steps."""
    import torch

    from fedlora.common.config import parse_config
    from fedlora.common.model import load_model, set_threads

    set_threads(threads)
    cfg = parse_config({"model.base": base, "train.batch-size": batch_size, "train.local-steps": steps,
                        "train.gradient-checkpointing": arm == "fedlora-gc", "train.max-grad-norm": 0.0,
                        "train.schedule": "constant", "train.warmup-ratio": 0.0})
    if arm == "plain":
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from fedlora.common.model import load_tokenizer, peft_config, resolve_base

        tokenizer = load_tokenizer(base)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=torch.float32),
                               peft_config(cfg.adapter))
    else:
        loaded = load_model(cfg.model, cfg.adapter)
        model, tokenizer = loaded.model, loaded.tokenizer
    data, batches = _batches(cfg, tokenizer, steps + 1, batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])

    if arm == "plain":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()

        def step(b) -> None:
            opt.zero_grad(set_to_none=True)
            model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
            opt.step()

        step(batches[0])
        rss = _status("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        for b in batches[1:]:
            step(b)
        seconds = (time.perf_counter() - start) / steps
    else:
        from fedlora.client.train import train

        train(model, data, cfg.train, pad_id=tokenizer.pad_token_id, steps=1, progress=False)  # warm-up
        rss = _status("VmRSS")
        _reset_peak()
        seconds = train(model, data, cfg.train, pad_id=tokenizer.pad_token_id, progress=False).seconds / steps
    return {"arm": arm, "seconds_per_step": seconds, "tokens_per_step": tokens / steps,
            "peak_mb_above_loaded": _status("VmHWM") - rss, "loaded_rss_mb": rss}


def _child(arm: str, args) -> dict:
    cmd = [sys.executable, "-m", "fedlora.simulations.bench.real_step", "--arm", arm, "--base", args.base,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"arm {arm} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from fedlora.common.offline import quiet_and_offline
    from fedlora.simulations.bench.timing import interleave, load_line, loadavg, spread

    quiet_and_offline()
    p = argparse.ArgumentParser(prog="python -m fedlora.simulations.bench.real_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="embedded", help="model.base: an imported base directory (default: embedded)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per arm and repeat (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench", help="directory for real_step.json")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in a child process
    args = p.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.base, args.batch_size, args.steps, args.threads)))
        return 0
    load0 = loadavg()
    results: dict[str, list[dict]] = {a: [] for a in ARMS}

    def timed(arm: str):
        def go() -> float:
            results[arm].append(_child(arm, args))
            r = results[arm][-1]
            print(f"  {arm}: {r['seconds_per_step']:.2f} s/step, peak {r['peak_mb_above_loaded']:.0f} MB above "
                  f"{r['loaded_rss_mb']:.0f} MB loaded", file=sys.stderr, flush=True)
            return r["seconds_per_step"]
        return go

    seconds = interleave({a: timed(a) for a in ARMS}, args.repeats)
    load1 = loadavg()
    plain = spread(seconds["plain"])["median"]
    rows = []
    print(f"one LoRA step, base {args.base}, batch {args.batch_size}, {args.repeats} repeats x {args.steps} steps")
    print("| arm | s/step (median) | spread | throughput vs plain | peak MB above loaded |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        s = spread(seconds[arm])
        mem = spread([r["peak_mb_above_loaded"] for r in results[arm]])["median"]
        rows.append({"arm": arm, **s, "throughput_vs_plain": plain / s["median"], "peak_mb_above_loaded": mem})
        print(f"| {arm} | {s['median']:.2f} | {s['spread_pct']:.0f} % | {plain / s['median']:.2f}x | {mem:.0f} |")
    print(load_line(load0, load1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_step.json").write_text(json.dumps({"rows": rows, "runs": results, "load": [load0, load1],
                                                     "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

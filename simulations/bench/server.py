"""Benchmark: the server's per-round work against numpy memcpy of the same bytes, in one run.

    python -m fedlora.simulations.bench.server [--updates 10 50] [--sizes 17 168] [--repeats 5] [--json F]

What is timed (the functions the round runs, ``fedlora.server.aggregation`` and ``fedlora.common.adapter``):

- **aggregate**: ``validate_update`` of each of K updates, ``weighted_sum`` of them and
  ``apply_mean`` onto the global adapter. Bytes touched: K*N read by validation, K*N read
  and N written by the sum, 2N read and N written by the step (N = adapter bytes).
- **aggregate with the defences** (the plain transport's default round): the same, plus the
  norm and weight bounds (K*N read for the norms), the direction screen and the audit (a
  coordinate-wise median and cosines on 65,536 sampled coordinates,
  ``fedlora.server.screen``). Its bandwidth counts the same bytes as **aggregate**'s, so the
  extra work shows as a lower ratio.
- **to_arrayrecord** (adapter -> Flower ``ArrayRecord``): N read, N written.
- **from_arrayrecord** (``ArrayRecord`` -> arrays): what it makes available is N bytes;
  the arrays are views of the record, so next to nothing is moved.
- for reference, Flower's own ``Array(ndarray)`` (``np.save`` into a ``BytesIO``) and
  ``ndarray.copy()``: one copy into newly allocated memory, the least ``to_arrayrecord``
  can do, since every ``Array`` owns a new ``bytes`` object whose pages the kernel must
  supply (and zero) when glibc has returned the previous round's to the OS.

Each is paired with ``np.copyto`` of the same source bytes into preallocated buffers (2
bytes touched per byte copied), run back to back with it, the order alternating, for
``--repeats`` repeats. Reported: the median effective bandwidth (bytes touched / s) of
both, the median of the per-repeat ratios to memcpy, and the spread of those ratios.

Adapters are float32 LoRA tensors of an 8B Llama (hidden 4096, 8 KV heads of 128,
MLP 14336, 32 layers), r = 16: **168 MB** with all seven linear modules adapted (448
tensors), **17 MB** with ``q_proj`` only (64 tensors). Memory: K updates are drawn from a
pool of four distinct random adapters (each update its own weight and metrics), and
memcpy copies the same pool arrays into four preallocated destinations, so 50 updates of
168 MB touch 8.4 GB while ~1.4 GB is resident; four adapters (68 MB at 17 MB) exceed the
32 MB last-level cache of the 2-core machine the README's figures come from.

The process's malloc is tuned first, as the ServerApp tunes its own (``fedlora.server.memory``:
freed tensors are kept for the next round instead of being faulted in again);
``--default-allocator`` measures glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict

import numpy as np

from fedlora.simulations.bench.timing import interleave, load_line, loadavg, ratio_summary, spread

HIDDEN, KV, MLP, LAYERS, RANK = 4096, 1024, 14336, 32, 16
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}
LAYOUTS = {17: ("q_proj",), 168: tuple(MODULES)}  # adapter MB -> adapted modules
POOL = 4


def adapter(modules: tuple[str, ...], seed: int) -> "OrderedDict[str, np.ndarray]":
    """LoRA A (r x in) and B (out x r) for ``modules`` of every layer, PEFT's names."""
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for layer in range(LAYERS):
        for m in modules:
            fan_in, fan_out = MODULES[m]
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            base = f"base_model.model.model.layers.{layer}.{block}.{m}"
            out[f"{base}.lora_A.weight"] = rng.standard_normal((RANK, fan_in), dtype=np.float32) * np.float32(0.01)
            out[f"{base}.lora_B.weight"] = rng.standard_normal((fan_out, RANK), dtype=np.float32) * np.float32(0.01)
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_aggregate(pool, glob, count: int, repeats: int, *, defended: bool = False) -> dict:
    """``defended``: the plain transport's whole round as the strategy runs it by default: the
    norm bounds, the direction screen on sampled coordinates, the sum, the audit and the step."""
    from fedlora.common.messages import TRAIN_METRICS
    from fedlora.server.aggregation import apply_mean, validate_update, weight_rule, weighted_sum
    from fedlora.server.bounds import UpdateBounds, audit, screen_out
    from fedlora.server.screen import DirectionScreen, sample

    n = sum(v.nbytes for v in glob.values())
    metrics = [{**{k: 1.0 for k in TRAIN_METRICS}, "num-examples": 100 + i, "tenant-id": i} for i in range(count)]
    weight_of = weight_rule("examples", max_weight=10_000)
    dests = [OrderedDict((k, np.empty_like(v)) for k, v in glob.items()) for _ in range(POOL)]
    for d in dests:  # fault the destination pages in before timing
        for v in d.values():
            v.fill(0)

    bounds, screen = UpdateBounds(norm_multiplier=3.0, weight_multiplier=2.0), DirectionScreen()

    def server_round():
        updates = [validate_update(pool[i % POOL], metrics[i], reference=glob, expected_metrics=TRAIN_METRICS,
                                   max_examples=100_000, weight_of=weight_of, node=i) for i in range(count)]
        if not defended:
            apply_mean(glob, weighted_sum(updates), server_lr=1.0)
            return
        bounded = bounds.apply(updates)
        view = sample(updates, coordinates=screen.coordinates, key=b"bench", server_round=1)
        outliers = screen.outliers(view)
        screen_out(bounded, outliers)
        summed = weighted_sum(bounded.kept)
        audit(updates, bounded, bounded.kept, summed.total, view=view, outliers=outliers)
        apply_mean(glob, summed, server_lr=1.0)

    def memcpy():
        for i in range(count):
            src, dst = pool[i % POOL], dests[i % POOL]
            for k, v in src.items():
                np.copyto(dst[k], v)

    server_round(), memcpy()  # warm-up
    t = interleave({"aggregate": lambda: _timed(server_round), "memcpy": lambda: _timed(memcpy)}, repeats)
    touched, copied = 2 * count * n + 4 * n, 2 * count * n
    bw = {"aggregate": [touched / s for s in t["aggregate"]], "memcpy": [copied / s for s in t["memcpy"]]}
    what = "validate + bounds + screen + sum + audit + apply" if defended else "validate + sum + apply"
    return _row(what, count, n, t, bw, "aggregate")


def bench_serialisation(pool, repeats: int) -> list[dict]:
    from fedlora.common.adapter import from_arrayrecord, to_arrayrecord

    state = pool[0]
    n = sum(v.nbytes for v in state.values())
    record = to_arrayrecord(state)
    dest = OrderedDict((k, np.zeros_like(v)) for k, v in state.items())

    def memcpy():
        for k, v in state.items():
            np.copyto(dest[k], v)

    def flower_path():  # what Flower's Array(ndarray) does: np.save into a BytesIO
        from flwr.app import Array, ArrayRecord

        return ArrayRecord(OrderedDict((k, Array(v)) for k, v in state.items()))

    fresh = lambda: OrderedDict((k, v.copy()) for k, v in state.items())  # noqa: E731  one copy, new memory
    rows = []
    arms = {"to_arrayrecord": lambda: to_arrayrecord(state), "from_arrayrecord": lambda: from_arrayrecord(record),
            "Flower's Array(ndarray)": flower_path, "np.copy into new memory": fresh}
    for name, fn in arms.items():
        fn(), memcpy()
        t = interleave({name: lambda: _timed(fn), "memcpy": lambda: _timed(memcpy)}, repeats)
        touched = n if name == "from_arrayrecord" else 2 * n  # from: the bytes it makes available
        bw = {name: [touched / s for s in t[name]], "memcpy": [2 * n / s for s in t["memcpy"]]}
        rows.append(_row(name, 1, n, t, bw, name))
    return rows


def _row(what: str, count: int, nbytes: int, t: dict, bw: dict, arm: str) -> dict:
    return {"what": what, "updates": count, "adapter_mb": nbytes / 1e6,
            "seconds": spread(t[arm]), "memcpy_seconds": spread(t["memcpy"]),
            "gb_per_s": spread(bw[arm])["median"] / 1e9, "memcpy_gb_per_s": spread(bw["memcpy"])["median"] / 1e9,
            "ratio": ratio_summary(bw[arm], bw["memcpy"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedlora.simulations.bench.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, nargs="+", default=[10, 50], help="updates per round")
    p.add_argument("--sizes", type=int, nargs="+", default=[17, 168], choices=sorted(LAYOUTS), help="adapter MB")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per pair (median reported)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's malloc as it is instead of tuning it as the ServerApp does (fedlora.server.memory)")
    args = p.parse_args(argv)
    from fedlora.server.memory import reuse_freed_memory

    tuned = False if args.default_allocator else reuse_freed_memory()
    print(f"allocator: {'tuned as the ServerApp tunes it (fedlora.server.memory)' if tuned else 'malloc defaults'}")
    load0 = loadavg()
    rows = []
    for size in args.sizes:
        pool = [adapter(LAYOUTS[size], seed) for seed in range(POOL)]
        glob = adapter(LAYOUTS[size], POOL)
        rows += [bench_aggregate(pool, glob, k, args.repeats, defended=d) for k in args.updates for d in (False, True)]
        rows += bench_serialisation(pool, args.repeats)
        del pool, glob
    load1 = loadavg()
    print("| what | updates | adapter MB | s (median) | GB/s touched | memcpy GB/s | ratio to memcpy | ratio spread |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["ratio"]
        print(f"| {r['what']} | {r['updates']} | {r['adapter_mb']:.1f} | {r['seconds']['median']:.4f} | "
              f"{r['gb_per_s']:.2f} | {r['memcpy_gb_per_s']:.2f} | {q['median']:.2f}x | "
              f"{q['min']:.2f}-{q['max']:.2f}x ({q['spread_pct']:.0f} %) |")
    print(load_line(load0, load1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "repeats": args.repeats, "allocator_tuned": tuned, "load_start": load0, "load_end": load1}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

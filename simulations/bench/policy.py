"""Benchmark: what a tenant policy adds to a round, as a ratio.

    python -m fedlora.simulations.bench.policy [--steps 10] [--repeats 5] [--threads 2] [--set KEY=VALUE ...]

Two arms run the tenant's real handlers (``fedlora.client.handlers.app``, the ClientApp every
node runs, with the policy mod) on one train message of the embedded base, interleaved repeat by
repeat after a discarded warm-up pair: one node under a policy (local DP required, SecAgg off,
every check in force: budget, noise, delta, compute ceilings, base fingerprint, evaluation count),
one without (the mod passes the message straight on). Both train with local DP at the same
settings on the same data, so the ratio is the policy's cost per round: its checks, the ledger
lock, the record count of the data and the reply filter. The check alone, around a handler that
does nothing, is timed too (median of ``--repeats`` x 20 messages).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fedlora.common.offline import quiet_and_offline

POLICY = """[privacy]
mode = "local"
delta = 1e-5
max-epsilon-per-run = 1000.0
lifetime-epsilon = 1e9
min-noise-multiplier = 0.1
min-batch-size = 4
[secagg]
required = false
[evaluation]
max-per-run = 100000
[bases]
embedded = "sha256:{fingerprint}"
"""


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="local steps per round (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per arm (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run-config key (repeatable)")
    args = p.parse_args(argv)

    import torch
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client.handlers import app
    from fedlora.client.policy_check import fingerprint
    from fedlora.client.policy_mod import tenant_policy
    from fedlora.common import messages as keys
    from fedlora.common.adapter import get_state, to_arrayrecord
    from fedlora.common.config import parse_config
    from fedlora.common.model import load_model
    from fedlora.simulations.bench.timing import interleave, load_line, loadavg, ratio_summary, spread
    from fedlora.simulations.scenario import parse_overrides
    from fedlora.simulations.synthetic import write_tenants

    torch.set_num_threads(args.threads)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a server's process has them
    overrides = {"privacy.mode": "local", "privacy.target-epsilon": 8.0, "privacy.delta": 1e-5,
                 "privacy.budget": 1e9, "secagg.enabled": False, "federation.rounds": 1,
                 "train.local-steps": args.steps, "train.threads": args.threads,
                 **parse_overrides(args.overrides)}
    cfg = parse_config(overrides)
    run_config = cfg.to_flat()
    state = get_state(load_model(cfg.model, cfg.adapter, for_training=False).model)
    start = loadavg()
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-policy-") as tmp:
        root = Path(tmp)
        write_tenants(root / "data", num_tenants=1, train_size=cfg.data.train_size, holdout_size=4,
                      preference_size=0, probe_size=2, seed=cfg.data.seed)
        policy = root / "policy.toml"
        policy.write_text(POLICY.format(fingerprint=fingerprint(cfg.model.base)))

        def node(name: str, with_policy: bool) -> dict:
            return {"data-path": str(root / "data" / "tenant_000" / "train.jsonl"), "tenant-id": 0,
                    "state-dir": str(root / name / "state"), "ledger-dir": str(root / name / "ledgers"),
                    **({"policy": str(policy)} if with_policy else {})}

        nodes = {"policy": node("policy", True), "none": node("none", False)}
        rounds = {"policy": 0, "none": 0}

        def message(run: int) -> Message:
            msg = Message(RecordDict({keys.ARRAYS: to_arrayrecord(state),
                                      keys.CONFIG: ConfigRecord({keys.ROUND: 1, keys.SEED: 0})}),
                          message_type="train", dst_node_id=1)
            msg.metadata.__dict__["_run_id"] = run  # a fresh run each round: one run's epsilon cap never binds
            return msg

        def arm(name: str):
            def one_round() -> float:
                rounds[name] += 1
                ctx = Context(run_id=rounds[name], node_id=1, node_config=nodes[name], state=RecordDict(),
                              run_config=run_config)
                t0 = time.perf_counter()
                reply = app(message(rounds[name]), ctx)
                seconds = time.perf_counter() - t0
                if reply.has_error():
                    raise SystemExit(f"the {name} arm's round failed: {reply.error.reason}")
                return seconds
            return one_round

        times = interleave({"policy": arm("policy"), "none": arm("none")}, args.repeats, warmup=1)

        def no_work(msg: Message, context: Context) -> Message:
            return Message(RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1, keys.TENANT: 0})}),
                           reply_to=msg)

        checks = []
        for r in range(args.repeats):
            ctx = Context(run_id=10_000 + r, node_id=1, node_config=nodes["policy"], state=RecordDict(),
                          run_config=run_config)
            t0 = time.perf_counter()
            for _ in range(20):
                tenant_policy(message(10_000 + r), ctx, no_work)
            checks.append((time.perf_counter() - t0) / 20)
    ratio = ratio_summary(times["policy"], times["none"])
    plain = spread(times["none"])
    print(f"one train round ({args.steps} local DP steps of batch {cfg.train.batch_size}, embedded base, "
          f"{args.repeats} repeats after a warm-up pair):")
    print(f"  without a policy {plain['median']:.2f} s, under a policy {statistics.median(times['policy']):.2f} s")
    print(f"  ratio policy / none: median {ratio['median']:.3f}x (min {ratio['min']:.3f}, max {ratio['max']:.3f})")
    check = statistics.median(checks)
    print(f"  the policy check alone (mod around a no-op handler): {1000 * check:.2f} ms per message, "
          f"{100 * check / plain['median']:.2f} % of a round")
    print(load_line(start, loadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

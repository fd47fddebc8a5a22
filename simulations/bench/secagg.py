"""Benchmark: a secure round over a plain round, same process, same synthetic deltas.

    python -m fedlora.simulations.bench.secagg                      # 4 and 10 tenants, 1 M floats
    python -m fedlora.simulations.bench.secagg --tenants 4 --floats 100000 --repeats 5

What runs: the real server strategies (``FedLoraStrategy`` and ``SecAggStrategy``) over an
in-process grid whose tenants answer with the real client code (``fedlora.client.secagg`` and
``fedlora.common.secagg_wire`` for the secure stages; a delta ArrayRecord for the plain round).
Training is replaced by a fixed synthetic delta, so the ratio compares what secure
aggregation adds to a round — key agreement, Shamir sharing, quantization, masking,
unmasking and the extra message exchanges — against the plain round's transport and
aggregation. Every message is serialized to Flower's protobuf form and back in both
directions (as the simulation engine does), and bytes are counted on that form. Tenants
run one after another, or ``--parallel N`` at a time (threads) as the simulation engine
runs N ClientApps at once; Flower's polling waits between exchanges are not included.
On the grid a third arm runs authenticated rounds: every tenant signs its keys and the survivor
set with its node identity key and checks its neighbours' against a roster (the consistency
round included). Each grid round is also timed as its critical path: the server's own work
plus, per exchange, only the slowest tenant's part (reading the request, handling it, writing
the reply), i.e. the round with each tenant on a machine of its own as in a deployment,
where the timed round has one CPU play every tenant in turn. Plain and secure rounds (or runs, on the simulation engine) alternate, the order reversed
every other repeat; the ratio is the median of the repeats' secure / plain, with its
spread. Prints a Markdown table and the load average at start and end; ``--json`` writes
the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import OrderedDict
from logging import WARNING
from pathlib import Path

from fedlora.common.offline import quiet_and_offline
from fedlora.simulations.bench.timing import interleave, load_line, loadavg, ratio_summary

import numpy as np


def _adapter(floats: int, tensors: int = 16) -> "OrderedDict[str, np.ndarray]":
    per = floats // tensors
    return OrderedDict((f"layer{i}.lora_A.weight", np.zeros(per, np.float32)) for i in range(tensors))


class _Grid:
    """Sends each message through protobuf to a tenant callable and the reply back;
    ``parallel`` tenants at a time, as the simulation engine runs that many ClientApps."""

    def __init__(self, tenants: dict, parallel: int = 1) -> None:
        self.tenants = tenants
        self.parallel = parallel
        self.bytes = {n: 0 for n in tenants}
        self.tenant_seconds = 0.0   # every tenant's share of every exchange, summed
        self.slowest_seconds = 0.0  # the slowest tenant's share of each exchange, summed

    def get_node_ids(self):
        return list(self.tenants)

    def send_and_receive(self, messages, *, timeout=None):
        from concurrent.futures import ThreadPoolExecutor

        from flwr.common.serde import message_from_proto, message_to_proto

        def one(m):
            node = m.metadata.dst_node_id
            down = message_to_proto(m)
            start = time.perf_counter()  # the tenant's part: read the message, handle it, write the reply
            reply = message_to_proto(self.tenants[node](message_from_proto(down)))
            return node, down.ByteSize() + reply.ByteSize(), reply, time.perf_counter() - start

        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            done = list(pool.map(one, list(messages)))
        for node, size, _, _ in done:
            self.bytes[node] += size
        if done:
            self.tenant_seconds += sum(d[3] for d in done)
            self.slowest_seconds += max(d[3] for d in done)
        return [message_from_proto(reply) for _, _, reply, _ in done]


def _plain_tenant(node: int, delta):
    from flwr.app import Message, MetricRecord, RecordDict

    from fedlora.common import messages as keys
    from fedlora.common.adapter import from_arrayrecord, to_arrayrecord

    def reply(msg):
        from_arrayrecord(msg.content.array_records[keys.ARRAYS])  # the tenant reads the global adapter
        m = {k: 1.0 for k in keys.TRAIN_METRICS} | {keys.NUM_EXAMPLES: 100, keys.TENANT: node}
        return Message(RecordDict({keys.ARRAYS: to_arrayrecord(delta), keys.METRICS: MetricRecord(m)}), reply_to=msg)
    return reply


def _secure_tenant(node: int, delta, q, identity=None, roster=None):
    from flwr.app import Message, MetricRecord, RecordDict

    from fedlora.client import secagg as client
    from fedlora.common import messages as keys
    from fedlora.common import secagg_wire as wire
    from fedlora.common.adapter import from_arrayrecord

    store: dict = {}

    def reply(msg):
        stage, c = msg.metadata.message_type.split(".", 1)[1], msg.content
        if stage == wire.SETUP:
            out = wire.setup_reply(*client.setup(store, node=node, identity=identity, **wire.read_setup_request(c)))
        elif stage == wire.SHARE:
            out = wire.share_reply(client.share_keys(store, roster=roster, **wire.read_share_request(c)))
        elif stage == wire.CONSISTENCY:
            out = wire.consistency_reply(client.consistency(store, identity=identity,
                                                            **wire.read_consistency_request(c)))
        elif stage == wire.UPLOAD:
            from_arrayrecord(c.array_records[keys.ARRAYS])
            vec = client.masked_upload(store, quantizer=q, train=lambda: (delta, 100), **wire.read_upload_request(c))
            m = {k: 1.0 for k in keys.SECAGG_TRAIN_METRICS} | {keys.TENANT: node}
            out = RecordDict({keys.ARRAYS: wire.upload_array(vec), keys.METRICS: MetricRecord(m)})
        else:
            out = wire.unmask_reply(client.unmask(store, roster=roster, **wire.read_unmask_request(c)))
        return Message(out, reply_to=msg)
    return reply


def _identities(tenants: int) -> tuple[dict[int, object], dict[int, object]]:
    """Node identity keys and the roster of them (authenticated rounds), as a deployment has them."""
    from fedlora.common.credentials import write_node_keypair
    from fedlora.common.secagg_identity import load_identity_key, load_roster

    with tempfile.TemporaryDirectory() as tmp:
        pairs = {1000 + i: write_node_keypair(Path(tmp), f"n{i}") for i in range(tenants)}
        (Path(tmp) / "roster.json").write_text(json.dumps({str(n): pub.read_text() for n, (_, pub) in pairs.items()}))
        return {n: load_identity_key(priv) for n, (priv, _) in pairs.items()}, load_roster(Path(tmp) / "roster.json")


def _round(secure: bool, tenants: int, floats: int, neighbours: int = 0, parallel: int = 1,
           identities=None) -> tuple[float, float]:
    """Seconds of one training round, bytes per tenant (down + up) and the round's critical path:
    its seconds with each tenant on a machine of its own (the server's work plus, per exchange, the
    slowest tenant's); ``identities``: (keys, roster) for an authenticated secure round (signed
    keys, consistency round)."""
    from fedlora.common.adapter import to_arrayrecord
    from fedlora.common.config import FederationConfig, SecAggConfig
    from fedlora.common.secagg import quantizer_for
    from fedlora.server.aggregation import FedAvg
    from fedlora.server.records import RoundRecorder
    from fedlora.server.secagg import SecAggTransport
    from fedlora.server.strategy import FedLoraStrategy

    fed = FederationConfig(min_train_nodes=2, fraction_evaluate=0.0, max_weight=1024)
    sec = SecAggConfig(enabled=secure, neighbours=neighbours)
    q = quantizer_for(sec, fed)
    base = _adapter(floats)
    rng = np.random.default_rng(0)
    deltas = [OrderedDict((k, rng.normal(0, 0.01, v.shape).astype(np.float32)) for k, v in base.items())
              for _ in range(tenants)]
    ids, roster = identities or ({}, None)
    nodes = {1000 + i: (_secure_tenant(1000 + i, deltas[i], q, ids.get(1000 + i), roster) if secure
                        else _plain_tenant(1000 + i, deltas[i])) for i in range(tenants)}
    grid = _Grid(nodes, parallel)
    with tempfile.TemporaryDirectory() as tmp:
        transport = SecAggTransport(sec, q, seed=0) if secure else None  # None: the plain transport
        strategy = FedLoraStrategy(fed, FedAvg(), RoundRecorder(tmp, save=lambda *a: None), transport=transport, seed=0)
        start = time.perf_counter()
        strategy.start(grid=grid, initial_arrays=to_arrayrecord(base), num_rounds=1, timeout=60)
        seconds = time.perf_counter() - start
    return seconds, sum(grid.bytes.values()) / tenants, seconds - grid.tenant_seconds + grid.slowest_seconds


def bench(tenants: int, floats: int, repeats: int, neighbours: int = 0, parallel: int = 1) -> dict:
    """Plain, secure and authenticated secure rounds interleaved (order reversed every other
    repeat); each ratio is the median of each repeat's secure / plain, with its spread, for the
    round as timed (one CPU plays every tenant in turn) and for its critical path."""
    identities = _identities(tenants)
    kinds = {"plain": dict(secure=False), "secure": dict(secure=True),
             "signed": dict(secure=True, identities=identities)}
    for kind in kinds.values():  # warm-up
        _round(tenants=tenants, floats=floats, neighbours=neighbours, parallel=parallel, **kind)
    sizes: dict[str, list] = {k: [] for k in kinds}
    critical: dict[str, list] = {k: [] for k in kinds}

    def arm(name: str):
        def run() -> float:
            seconds, size, path = _round(tenants=tenants, floats=floats, parallel=parallel,
                                         neighbours=neighbours if name != "plain" else 0, **kinds[name])
            sizes[name].append(size)
            critical[name].append(path)
            return seconds
        return run

    t = interleave({k: arm(k) for k in kinds}, repeats)
    row = {"tenants": tenants, "neighbours": neighbours or tenants - 1, "floats": floats,
           "plain_bytes_per_tenant": sizes["plain"][0], "secure_bytes_per_tenant": sizes["secure"][0],
           "signed_bytes_per_tenant": sizes["signed"][0]}
    for timing, prefix in ((t, ""), (critical, "critical_")):
        row.update({f"{prefix}{k}_seconds": statistics.median(timing[k]) for k in kinds})
        for k, key in (("secure", "ratio"), ("signed", "signed_ratio")):
            spread = ratio_summary(timing[k], timing["plain"])
            row[f"{prefix}{key}"], row[f"{prefix}{key}_spread"] = spread["median"], spread
    return row


def _adapter_rank_for(floats: int) -> int:
    """LoRA rank on all linear layers of the embedded base whose adapter holds ~``floats``."""
    from fedlora.common.config import parse_config
    from fedlora.common.model import count_parameters, load_model

    cfg = parse_config({"adapter.r": 1})
    per_rank, _ = count_parameters(load_model(cfg.model, cfg.adapter).model)
    return max(1, round(floats / per_rank))


def simulation_round_seconds(tenants: int, secure: bool, rank: int, rounds: int, out: Path) -> dict:
    """Median seconds of rounds 2.. of a real ``fedlora simulate`` run (Flower's simulation
    engine; round 1 carries the ClientApps' cold start), one local step per round."""
    from fedlora.common.records import read_rounds, read_summary
    from fedlora.simulations.cli.simulate import simulate
    from fedlora.simulations.scenario import resolve

    run_dir = (out / f"{'secure' if secure else 'plain'}_{tenants}").resolve()
    overrides = {"simulation.tenants": tenants, "adapter.r": rank, "federation.rounds": rounds,
                 "train.local-steps": 1, "data.train-size": 32, "data.holdout-size": 8,
                 "eval.probe-size": 8, "data.preference-size": 8, "secagg.enabled": secure,
                 "federation.min-train-nodes": tenants, "run.baselines": False, "dpo.enabled": False,
                 "publish.enabled": False}
    simulate(resolve("default", overrides, str(run_dir)))
    rows, fed = read_rounds(run_dir), read_summary(run_dir)
    finished = sum(len(r.finished) for r in rows)
    return {"seconds": statistics.median(r.seconds for r in rows[1:]), "rounds": len(rows),
            "bytes_per_tenant": (fed.bytes_up + fed.bytes_down) / max(1, finished)}


def main_simulation(args) -> int:
    load0 = loadavg()
    rank = _adapter_rank_for(args.floats)
    out = Path(args.out or tempfile.mkdtemp(prefix="fedlora-bench-secagg-"))
    rows = []
    for n in args.tenants:
        got: dict[str, list[dict]] = {"plain": [], "secure": []}

        def arm(secure: bool):
            def run() -> float:
                r = simulation_round_seconds(n, secure, rank, args.rounds, out / f"repeat{len(got['plain'])}")
                got["secure" if secure else "plain"].append(r)
                return r["seconds"]
            return run

        t = interleave({"plain": arm(False), "secure": arm(True)}, args.repeats or 1)
        ratio = ratio_summary(t["secure"], t["plain"])
        rows.append({"tenants": n, "rank": rank, "plain_seconds": statistics.median(t["plain"]),
                     "secure_seconds": statistics.median(t["secure"]), "ratio": ratio["median"],
                     "ratio_spread": ratio, "plain_bytes_per_tenant": got["plain"][0]["bytes_per_tenant"],
                     "secure_bytes_per_tenant": got["secure"][0]["bytes_per_tenant"]})
    _report(rows, [("tenants", lambda r: r["tenants"]),
                   ("LoRA rank (floats)", lambda r: f"{r['rank']} (~{args.floats:,})"),
                   *_timing_columns(2, "tenant-round")], args.json)
    print(load_line(load0, loadavg()))
    return 0


def _timing_columns(decimals: int, per: str) -> list:
    """The columns both engines report: round seconds, their ratio, bytes per ``per``."""
    return [("plain round s", lambda r: f"{r['plain_seconds']:.{decimals}f}"),
            ("secure round s", lambda r: f"{r['secure_seconds']:.{decimals}f}"),
            ("secure / plain", lambda r: f"{r['ratio']:.2f}x"),
            ("ratio min-max (spread)", lambda r: f"{r['ratio_spread']['min']:.2f}-{r['ratio_spread']['max']:.2f}x "
                                                 f"({r['ratio_spread']['spread_pct']:.0f} %)"),
            (f"plain bytes/{per}", lambda r: f"{r['plain_bytes_per_tenant']:,.0f}"),
            (f"secure bytes/{per}", lambda r: f"{r['secure_bytes_per_tenant']:,.0f}")]


def _report(rows: list[dict], columns: list, json_path: str | None) -> None:
    """Print ``rows`` as a Markdown table of ``(header, cell)`` columns; optionally save them."""
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(cell(r)) for _, cell in columns) + " |")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=2)


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    p = argparse.ArgumentParser(prog="python -m fedlora.simulations.bench.secagg", description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, nargs="+", default=[4, 10])
    p.add_argument("--floats", type=int, default=1_000_000, help="adapter size in floats")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats of each kind, median reported (grid: timed rounds, default 3; "
                        "simulation: runs, default 1)")
    p.add_argument("--neighbours", type=int, default=0, help="secagg.neighbours (0 = every other tenant)")
    p.add_argument("--parallel", type=int, default=1, help="tenants served at once (simulation: CPUs per tenant)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--engine", choices=("grid", "simulation"), default="grid",
                   help="grid: in-process grid, no training (default); simulation: real `fedlora simulate` "
                        "runs on Flower's simulation engine, adapter rank sized to --floats, one local step")
    p.add_argument("--rounds", type=int, default=3, help="simulation engine: rounds per run (round 1 not timed)")
    p.add_argument("--out", help="simulation engine: where the runs go (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.engine == "simulation":
        if args.rounds < 2:
            p.error("--rounds must be at least 2 (round 1 carries the cold start and is not timed)")
        return main_simulation(args)
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.supercore.task_identity import TaskIdentity

    FLOWER_LOGGER.setLevel(WARNING)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # messages outside a run
    load0 = loadavg()
    rows = [bench(n, args.floats, args.repeats or 3, args.neighbours, args.parallel) for n in args.tenants]
    def ratio(key: str):
        return lambda r: (f"{r[key]:.2f}x ({r[key + '_spread']['min']:.2f}-{r[key + '_spread']['max']:.2f}, "
                          f"{r[key + '_spread']['spread_pct']:.0f} %)")

    _report(rows, [("tenants", lambda r: r["tenants"]), ("neighbours", lambda r: r["neighbours"]),
                   ("floats", lambda r: f"{r['floats']:,}"),
                   ("plain / secure / authenticated round s", lambda r: " / ".join(
                       f"{r[k + '_seconds']:.3f}" for k in ("plain", "secure", "signed"))),
                   ("secure / plain", ratio("ratio")), ("authenticated / plain", ratio("signed_ratio")),
                   ("critical path s", lambda r: " / ".join(
                       f"{r['critical_' + k + '_seconds']:.3f}" for k in ("plain", "secure", "signed"))),
                   ("secure / plain, critical path", ratio("critical_ratio")),
                   ("authenticated / plain, critical path", ratio("critical_signed_ratio")),
                   ("bytes/tenant plain / secure / authenticated", lambda r: " / ".join(
                       f"{r[k + '_bytes_per_tenant']:,.0f}" for k in ("plain", "secure", "signed")))], args.json)
    print(load_line(load0, loadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

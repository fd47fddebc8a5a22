"""Benchmark: seconds per round on the Deployment Engine vs the simulation engine, and
where a deployment message's round trip goes.

    python -m fedlora.simulations.bench.deployment [--tenants 3] [--rounds 2] [--repeats 1] [--no-worker-arm]
                                           [--evaluate-with-train-arm]
                                           [--set KEY=VALUE ...]

1. Writes synthetic tenants once; every run uses the same files and the same config.
2. Deployment: a SuperLink with TLS + node auth + SQLite and one tenant node per tenant on
   127.0.0.1 (``fedlora.simulations.cli.local_federation.LocalFederation``: SuperNode + tenant worker, as
   ``fedlora deploy supernode`` runs them: the worker pulls and answers each task itself,
   and has loaded the run's model before the run starts, as ``--warm`` makes it do);
   2 rounds. With ``--no-worker-arm`` also without workers (each task runs in a fresh
   process of the node's fedlora, which loads the model). With ``--evaluate-with-train-arm`` also both engines
   with ``federation.evaluate-with-train`` (each round's evaluation rides on the next round's
   training message), each against the other engine and against its own separate evaluation.
3. Simulation: the same run through ``fedlora simulate`` (no baselines).
   The arms alternate run by run (``--repeats``); the ratio is each repeat's mean round over
   the simulation's, median and spread, with the load average at start and end. The ratio of
   the rounds after the first (no start-up in either engine) is reported beside it.
4. From the time-stamped SuperNode and run logs, splits each message's round trip into:
   waiting for the SuperNode's poll, the ClientApp process (start, imports, model load,
   the work itself) and waiting for the ServerApp's poll; and times a cold ClientApp
   start (imports + model load) on its own.

Writes ``bench.json`` and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedlora.common.offline import quiet_and_offline
from fedlora.common.records import RoundRecord, read_rounds, read_summary

_NODE = re.compile(r"^(\d+\.\d+) .*(Receiving|Sending): (train|evaluate) message")
_SPAWNED = re.compile(r"^(\d+\.\d+) .*(?:Start `flwr-clientapp` process|took a ClientApp task)")
_SENT = re.compile(r"^(\d+\.\d+) .*Sent successfully")


def _stamps(path: Path, pattern: re.Pattern) -> list[tuple]:
    return [m.groups() for line in path.read_text(errors="replace").splitlines() if (m := pattern.match(line))]


def exchanges(cfg) -> list[tuple[int, str]]:
    """The run's exchanges in order, (round, kind): a train and an evaluate per round, or with
    ``federation.evaluate-with-train`` a train per round and one evaluate after the last."""
    rounds = cfg.federation.rounds
    if cfg.federation.evaluate_with_train:
        return [(k, "train") for k in range(1, rounds + 1)] + [(rounds, "evaluate")]
    return [(k, kind) for k in range(1, rounds + 1) for kind in ("train", "evaluate")]


def message_breakdown(flower_log: Path, node_logs: list[Path], rounds: list[RoundRecord],
                      order: list[tuple[int, str]]) -> dict[str, float]:
    """Median seconds per message: SuperNode poll wait, ClientApp process, reply upload, ServerApp
    pickup. ``order``: the run's exchanges (:func:`exchanges`), each one message to every tenant.

    When the ServerApp began each push, and when it had the exchange's replies, come from the
    grid's own line per exchange (``fedlora.server.grid.EXCHANGE_LINE``, stamped in the ServerApp): the
    time stamps of the run log are when its lines reached ``flwr run``'s stream, up to a second
    late."""
    from fedlora.server.grid import parse_exchange_line

    lines = flower_log.read_text(errors="replace").splitlines()
    grid = [e for line in lines if (e := parse_exchange_line(line)) is not None]  # one per exchange

    def pushed(j: int) -> float | None:  # when the ServerApp began pushing exchange j's messages
        return grid[j]["pushed_at"] if j < len(grid) else None

    def replies_in(j: int) -> float | None:  # when the ServerApp had exchange j's last reply
        return grid[j]["last_reply_at"] if j < len(grid) else None

    by_round = {r.round: r for r in rounds}

    def work(j: int, tenant: str) -> float | None:  # the training / evaluation the message did
        k, kind = order[j]
        r = by_round.get(k)
        if r is None:
            return None
        if kind == "evaluate":
            return r.eval.get(tenant, {}).get("eval-seconds")
        seconds = r.train.get(tenant, {}).get("train-seconds")
        before = by_round.get(k - 1)
        if seconds is not None and before is not None and (k - 1, "evaluate") not in order:
            seconds += before.eval.get(tenant, {}).get("eval-seconds", 0.0)  # evaluated with this training
        return seconds

    wait, spawn, process, upload, worked, beyond = [], [], [], [], [], []
    uploaded_by: dict[int, float] = {}  # exchange -> when its last reply reached the SuperLink
    for i, log in enumerate(node_logs):
        events = _stamps(log, _NODE)
        received = [(float(t), kind) for t, what, kind in events if what == "Receiving"]
        sent = [(float(t), kind) for t, what, kind in events if what == "Sending"]
        spawned = [float(t) for (t,) in _stamps(log, _SPAWNED)]
        spawn += [t_up - t_in for (t_in, _), t_up in zip(received, spawned)]
        uploaded = [float(t) for (t,) in _stamps(log, _SENT)]
        upload += [t_ok - t_out for (t_out, _), t_ok in zip(sent, uploaded)]
        for j, ((t_in, _kind), (t_out, _), t_ok) in enumerate(zip(received, sent, uploaded)):
            if j >= len(order) or (t_push := pushed(j)) is None:
                continue
            wait.append(t_in - t_push)
            process.append(t_out - t_in)
            if (w := work(j, str(i))) is not None:
                worked.append(w)
                beyond.append(t_out - t_in - w)
            uploaded_by[j] = max(uploaded_by.get(j, t_ok), t_ok)
    pickup = [t - uploaded_by[j] for j in sorted(uploaded_by) if (t := replies_in(j)) is not None]
    med = lambda xs: round(statistics.median(xs), 2) if xs else float("nan")  # noqa: E731
    return {"supernode_poll_wait": med(wait), "clientapp_process": med(process),
            "of_which_until_clientapp_logs": med(spawn), "of_which_work": med(worked),
            "of_which_beyond_the_work": med(beyond),
            "reply_upload": med(upload), "serverapp_pickup": med(pickup),
            "serverapp_push": med([e["push_seconds"] for e in grid]), "messages": len(process)}


def cold_clientapp_seconds(cfg, data_path: Path) -> dict[str, float]:
    """A fresh process: import the ClientApp, load base + adapter, read and tokenize the data."""
    code = f"""
import json, time
t0 = time.perf_counter()
import fedlora.client.handlers
t1 = time.perf_counter()
from fedlora.client.task import session, tenant_data, tenant_from_node_config
from fedlora.common.config import parse_config
cfg = parse_config({json.dumps({"model.base": cfg.model.base, "train.threads": cfg.train.threads})})
loaded = session(cfg)
t2 = time.perf_counter()
tenant_data(tenant_from_node_config({{"data-path": {json.dumps(str(data_path))}}}, cfg), cfg, loaded.tokenizer)
t3 = time.perf_counter()
print(json.dumps({{"import_clientapp": t1 - t0, "load_model": t2 - t1, "load_data": t3 - t2}}))
"""
    from fedlora.simulations.cli.deployment import flower_env

    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=flower_env(Path("/nonexistent-flwr-home")))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["whole_process"] = time.perf_counter() - start
    return {k: round(v, 2) for k, v in result.items()}


def per_round(run_dir: Path) -> list[float]:
    return [r.seconds for r in read_rounds(run_dir)]


class NodeMemory:
    """Peak resident memory of each tenant node's process tree (supervisor, worker, SuperNode,
    its ClientApp processes), sampled from /proc while the run goes."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25):
        from fedlora.simulations.cli.memory import PeakTreeMemory

        self.meters = {name: PeakTreeMemory(interval, root=pid) for name, pid in pids.items()}

    @property
    def peak(self) -> dict[str, int]:
        return {name: m.peak_bytes for name, m in self.meters.items()}

    def __enter__(self) -> "NodeMemory":
        for m in self.meters.values():
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in self.meters.values():
            m.__exit__(*exc)


def deployment_arm(cfg, data: Path, out: Path, *, tenants: int, worker: bool, repeat: int = 0,
                   prefix: str = "") -> dict:
    """One 2-round run on a fresh local federation (TLS + node auth); per-round seconds, the
    message breakdown and each node's peak memory."""
    from fedlora.simulations.cli.local_federation import LocalFederation, Tenant

    name = "deployment" if worker else "deployment_no_worker"
    name += f"_{repeat}" if repeat else ""
    name = prefix + name  # its directories' names
    run_cfg = cfg.replace(**{"run.dir": str(out / f"{name}_run")})
    for old in (out / f"{name}_federation", out / f"{name}_run"):  # an earlier invocation's (its keys are registered there)
        shutil.rmtree(old, ignore_errors=True)
    t = time.perf_counter()
    with LocalFederation(out / f"{name}_federation") as fed:
        for i in range(tenants):
            fed.start_node(Tenant(f"tenant-{i}", i, data / f"tenant_{i:03d}" / "train.jsonl"), worker=worker,
                           warm=run_cfg if worker else None)
        fed.wait_online(tenants)
        warm = fed.wait_warm() if worker else {}
        up = time.perf_counter() - t
        with NodeMemory({n: p.popen.pid for n, p in fed.procs.items() if n.startswith("supernode-")}) as mem:
            fed.run(run_cfg)
        node_logs = [fed.procs[f"supernode-tenant-{i}"].log for i in range(tenants)]
    run_dir = Path(run_cfg.run.dir)
    return {"seconds_per_round": per_round(run_dir), "startup_seconds": round(up, 1),
            "warm_up_seconds": [w.get("seconds") for w in warm.values()],
            "breakdown": message_breakdown(run_dir / "flower.log", node_logs, read_rounds(run_dir), exchanges(run_cfg)),
            "node_peak_mb": {n: round(b / 2**20) for n, b in mem.peak.items()}}


def simulation_arm(cfg, data: Path, out: Path, repeat: int = 0, prefix: str = "") -> dict:
    from fedlora.simulations.cli.simulate import simulate

    run_dir = out / (prefix + "simulation_run" + (f"_{repeat}" if repeat else ""))
    shutil.rmtree(run_dir, ignore_errors=True)
    run_cfg = cfg.replace(**{"run.dir": str(run_dir), "data.dir": str(data)})
    simulate(run_cfg)
    return {"seconds_per_round": per_round(Path(run_cfg.run.dir))}


def overhead(b: dict) -> float:
    """Median seconds of a message outside its training or evaluation: the SuperNode's poll wait,
    the ClientApp process beyond the work (message by message where the breakdown has it), and the
    reply's upload."""
    beyond = b.get("of_which_beyond_the_work", b["clientapp_process"] - b["of_which_work"])
    return round(b["supernode_poll_wait"] + beyond + b["reply_upload"], 2)


FUSED = "evaluate-with-train: "  # the arms with federation.evaluate-with-train


def baseline(arm: str) -> str:
    """The simulation arm an arm is compared with: the one of the same config."""
    return FUSED + "simulation" if arm.startswith(FUSED) else "simulation"


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()
    from fedlora.simulations.bench.timing import interleave, load_line, loadavg, ratio_summary
    from fedlora.simulations.scenario import parse_overrides, resolve
    from fedlora.simulations.synthetic import write_tenants

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of each arm (median reported)")
    p.add_argument("--no-worker-arm", action="store_true",
                   help="also run the deployment without tenant workers (a model load per message)")
    p.add_argument("--evaluate-with-train-arm", action="store_true",
                   help="also run both engines with federation.evaluate-with-train (one exchange per round fewer)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("runs/bench_deployment"))
    args = p.parse_args(argv)
    out = args.out.resolve()
    flat = {"simulation.tenants": args.tenants, "federation.rounds": args.rounds,
            "federation.min-train-nodes": args.tenants, "federation.round-timeout": 300.0,
            "train.local-steps": 10, "data.train-size": 64, "data.holdout-size": 16, "run.baselines": False,
            "dpo.enabled": False, "publish.enabled": False,  # only the federated rounds are compared
            # Simulation gives each tenant one core; so do we, or three ClientApps on one host
            # each take every core and thrash.
            "train.threads": 1,
            **parse_overrides(args.set)}
    data = out / "data"
    cfg = resolve("default", flat, str(out / "run"))
    write_tenants(data, num_tenants=args.tenants, train_size=cfg.data.train_size,
                  holdout_size=cfg.data.holdout_size, preference_size=8, seed=cfg.data.seed)
    load0, results = loadavg(), {}

    def arm(name, fn):
        def run() -> float:
            results.setdefault(name, []).append(fn())
            return statistics.mean(results[name][-1]["seconds_per_round"])
        return run

    def done(name: str) -> int:  # runs of an arm so far: each repeat gets its own directories
        return len(results.get(name, []))

    arms = {"deployment": arm("deployment", lambda: deployment_arm(cfg, data, out, tenants=args.tenants, worker=True,
                                                                    repeat=done("deployment"))),
            "simulation": arm("simulation", lambda: simulation_arm(cfg, data, out, repeat=done("simulation")))}
    if args.evaluate_with_train_arm:
        fused = cfg.replace(**{"federation.evaluate-with-train": True})
        arms[FUSED + "deployment"] = arm(FUSED + "deployment", lambda: deployment_arm(
            fused, data, out, tenants=args.tenants, worker=True, repeat=done(FUSED + "deployment"), prefix="fused_"))
        arms[FUSED + "simulation"] = arm(FUSED + "simulation", lambda: simulation_arm(
            fused, data, out, repeat=done(FUSED + "simulation"), prefix="fused_"))
    if args.no_worker_arm:
        arms["deployment_no_worker"] = arm("deployment_no_worker", lambda: deployment_arm(
            cfg, data, out, tenants=args.tenants, worker=False, repeat=done("deployment_no_worker")))
    t = interleave(arms, args.repeats)
    load1 = loadavg()
    ratios = {n: ratio_summary(t[n], t[baseline(n)]) for n in t if n != baseline(n)}
    later = {n: [statistics.mean(r["seconds_per_round"][1:] or r["seconds_per_round"]) for r in results[n]]
             for n in results}
    later_ratios = {n: ratio_summary(later[n], later[baseline(n)]) for n in later if n != baseline(n)}
    if args.evaluate_with_train_arm:  # what one exchange per round fewer saves, engine by engine
        for engine in ("deployment", "simulation"):
            ratios[f"{FUSED}{engine} / {engine}"] = ratio_summary(t[FUSED + engine], t[engine])
    summary = {"tenants": args.tenants, "rounds": args.rounds, "local_steps": cfg.train.local_steps,
               "repeats": args.repeats, "mean_round_seconds": t, "over_simulation": ratios,
               "after_round_1_over_simulation": later_ratios, "runs": results,
               "cold_clientapp_seconds": cold_clientapp_seconds(cfg, data / "tenant_000" / "train.jsonl"),
               "load_start": load0, "load_end": load1}
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    print("\n| engine | seconds per round (each run) | mean round / simulation's | rounds after the first / "
          "simulation's | message outside the work | node peak memory |\n|---|---|---|---|---|---|")
    for name in (n for n in ratios if n not in results):
        rat = ratios[name]
        print(f"| {name} | | {rat['median']:.2f}x ({rat['min']:.2f}-{rat['max']:.2f}) | | | |")
    for name, runs in results.items():
        rounds = "; ".join(", ".join(f"{s:.1f}" for s in r["seconds_per_round"]) for r in runs)
        rat = ratios.get(name)
        ratio = f"{rat['median']:.2f}x ({rat['min']:.2f}-{rat['max']:.2f})" if rat else "1"
        lat = later_ratios.get(name)
        ratio += f" | {lat['median']:.2f}x ({lat['min']:.2f}-{lat['max']:.2f})" if lat else " | 1"
        if "breakdown" in runs[0]:
            extra = (f"{statistics.median(overhead(r['breakdown']) for r in runs):.2f} s | "
                     f"{max(max(r['node_peak_mb'].values()) for r in runs)} MB")
        else:
            extra = "- | -"
        print(f"| {name} | {rounds} | {ratio} | {extra} |")
    for name, runs in results.items():
        if "breakdown" in runs[-1]:
            b = runs[-1]["breakdown"]
            print(f"\n{name}, per message (median of {b['messages']}): SuperNode poll wait {b['supernode_poll_wait']} s, "
                  f"ClientApp process {b['clientapp_process']} s (until it logs {b['of_which_until_clientapp_logs']} s; "
                  f"the work {b['of_which_work']} s; beyond it, message by message, {b['of_which_beyond_the_work']} s), reply upload {b['reply_upload']} s, ServerApp pickup "
                  f"{b['serverapp_pickup']} s; the ServerApp's push of an exchange {b['serverapp_push']} s.")
    c = summary["cold_clientapp_seconds"]
    print(f"\nA cold ClientApp process without a worker: imports {c['import_clientapp']} s, model load "
          f"{c['load_model']} s, data {c['load_data']} s, whole process {c['whole_process']} s.")
    print(load_line(load0, load1))
    print(f"Written to {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tenant worker with the real handlers: a message answered by a worker process is the
message the in-process ClientApp would answer, and a secure round under local DP-SGD runs
through workers (the SecAgg+ keys live in the context state between the four stages, the
privacy ledger in each tenant's state directory).

Each tenant has a real worker process (``python -m fedlora.client.worker``) on its own socket; the
server side is the real strategy (``fedlora.server.server_app.make_strategy``) over a grid that hands
each message to the forwarding ClientApp with that tenant's context, as a SuperNode would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.client import client_app, worker_link
from fedlora.client.handlers import app as in_process
from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, get_state, to_arrayrecord
from fedlora.common.config import parse_config
from fedlora.common.model import load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TENANTS = 2


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """One worker process per tenant, each on its own socket."""
    root = tmp_path_factory.mktemp("workers")
    sockets = [worker_link.socket_path(root / f"node-{i}") for i in range(TENANTS)]
    procs = [subprocess.Popen([sys.executable, "-m", "fedlora.client.worker", "--socket", str(s)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for s in sockets]
    try:
        for sock, proc in zip(sockets, procs):
            deadline = time.monotonic() + 300
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the worker did not come up"
                time.sleep(0.2)
        yield sockets
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tenants_dir(tmp_path_factory):
    """This module's own tenants: the ledgers the secure round writes stay here."""
    from fedlora.simulations.synthetic import write_tenants

    out = tmp_path_factory.mktemp("tenants")
    write_tenants(out, num_tenants=TENANTS, train_size=48, holdout_size=8, preference_size=8, seed=0)
    return out


def _cfg(tenants_dir, **extra):
    return parse_config({"train.local-steps": 3, "train.batch-size": 8, "train.threads": 1, "eval.max-new-tokens": 8,
                         "data.dir": str(tenants_dir), **extra})


def _context(cfg, partition: int, socket: Path | None, state_dir: Path | None = None) -> Context:
    node_config = {"partition-id": partition, "num-partitions": TENANTS,
                   **({"state-dir": str(state_dir)} if state_dir else {})}
    if socket is not None:
        node_config[worker_link.NODE_CONFIG_KEY] = str(socket)
    return Context(run_id=1, node_id=100 + partition, node_config=node_config, state=RecordDict(),
                   run_config=cfg.to_flat())


def test_worker_reply_equals_the_in_process_reply(workers, tenants_dir):
    # Prepare: one train request, answered once by tenant 1's worker and once in this process
    cfg = _cfg(tenants_dir)
    global_state = get_state(load_model(cfg.model, cfg.adapter, for_training=False).model)
    content = RecordDict({keys.ARRAYS: to_arrayrecord(global_state),
                          keys.CONFIG: ConfigRecord({keys.ROUND: 1, keys.SEED: 0})})
    msg = Message(content=content, message_type="train", dst_node_id=101)
    # Execute
    via_worker = client_app.handle(msg, _context(cfg, 1, workers[1]))
    local = in_process(msg, _context(cfg, 1, None))
    # Assert: the same delta to the byte, the same metrics but the wall time
    a, b = (from_arrayrecord(r.content.array_records[keys.ARRAYS]) for r in (via_worker, local))
    assert list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    ma, mb = (dict(r.content.metric_records[keys.METRICS]) for r in (via_worker, local))
    assert {k: v for k, v in ma.items() if k != "train-seconds"} == {k: v for k, v in mb.items()
                                                                     if k != "train-seconds"}


class WorkerGrid:
    """Hands each message to the forwarding ClientApp with its tenant's context (kept between
    messages, as the SuperNode keeps it)."""

    def __init__(self, contexts: dict[int, Context]):
        self.contexts = contexts
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m.metadata.message_type)
            replies.append(client_app.handle(m, self.contexts[m.metadata.dst_node_id]))
        return replies


def test_secure_round_under_local_dp_runs_through_the_workers(workers, tenants_dir, tmp_path):
    # Prepare: SecAgg+ and local DP-SGD, two tenants, one round
    from fedlora.server.records import RoundRecorder
    from fedlora.server.server_app import make_strategy

    cfg = _cfg(tenants_dir, **{"secagg.enabled": True, "privacy.mode": "local", "privacy.target-epsilon": 8.0,
                               "privacy.delta": 1e-5, "privacy.budget": 100.0, "federation.rounds": 1,
                               "federation.min-train-nodes": TENANTS, "simulation.tenants": TENANTS})
    contexts = {100 + i: _context(cfg, i, workers[i], tmp_path / f"state-{i}") for i in range(TENANTS)}  # fresh ledgers: other tests here released without DP (epsilon = inf)
    before = [worker_link.health(s)["served"] for s in workers]
    initial = get_state(load_model(cfg.model, cfg.adapter, for_training=False).model)
    strategy = make_strategy(cfg, RoundRecorder(tmp_path, save=lambda p, s, r: None))
    grid = WorkerGrid(contexts)
    # Execute
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=1, timeout=300,
                            train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    # Assert: the secure round aggregated both tenants' updates and moved the adapter
    record = json.loads((tmp_path / "metrics" / "round_001.json").read_text())
    assert record["secagg"]["enabled"] and record["secagg"]["finished"] == TENANTS and record["aggregated"]
    final = from_arrayrecord(result.arrays)
    assert any(not np.array_equal(final[k], initial[k]) for k in initial)
    # ... every stage was answered by a worker (four SecAgg+ stages and the evaluation each) ...
    served = [worker_link.health(s)["served"] - b for s, b in zip(workers, before)]
    assert served == [5] * TENANTS and grid.sent.count("evaluate") == TENANTS
    # ... and each tenant's ledger charged this round's epsilon
    for i in range(TENANTS):
        assert record["train"][str(i)]["dp-epsilon"] > 0
        ledger = tmp_path / f"state-{i}"
        assert any(ledger.iterdir()), f"tenant {i} has no ledger"


def test_a_secure_run_evaluates_each_round_with_the_next_rounds_upload(workers, tenants_dir, tmp_path):
    # Prepare: SecAgg+, two rounds, each round's adapter evaluated with the next round's training
    from fedlora.server.records import RoundRecorder
    from fedlora.server.server_app import make_strategy

    cfg = _cfg(tenants_dir, **{"secagg.enabled": True, "federation.rounds": 2, "federation.evaluate-with-train": True,
                               "federation.min-train-nodes": TENANTS, "simulation.tenants": TENANTS})
    contexts = {100 + i: _context(cfg, i, workers[i]) for i in range(TENANTS)}
    initial = get_state(load_model(cfg.model, cfg.adapter, for_training=False).model)
    strategy = make_strategy(cfg, RoundRecorder(tmp_path, save=lambda p, s, r: None))
    grid = WorkerGrid(contexts)
    # Execute
    strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=2, timeout=300,
                   train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    # Assert: one evaluation exchange (after the last round), and both rounds evaluated by both tenants
    assert grid.sent.count("evaluate") == TENANTS
    records = [json.loads((tmp_path / "metrics" / f"round_{k:03d}.json").read_text()) for k in (1, 2)]
    for record in records:
        assert record["aggregated"] and sorted(record["eval"]) == ["0", "1"] and record["dropped"] == []
        assert all(set(m) == keys.EVAL_METRICS for m in record["eval"].values())

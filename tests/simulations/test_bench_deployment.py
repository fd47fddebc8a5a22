"""The deployment benchmark's arithmetic: what counts as a message's overhead, and whose memory."""

from __future__ import annotations

import os

from fedlora.common.config import parse_config
from fedlora.simulations.bench.deployment import FUSED, NodeMemory, baseline, exchanges, overhead


def test_overhead_is_poll_wait_plus_process_beyond_the_work_plus_upload():
    # Prepare: 0.1 s poll wait, a 5.0 s ClientApp process of which 4.0 s work, 0.3 s upload
    breakdown = {"supernode_poll_wait": 0.1, "clientapp_process": 5.0, "of_which_work": 4.0, "reply_upload": 0.3}
    # Execute / Assert: 0.1 + (5.0 - 4.0) + 0.3
    assert overhead(breakdown) == 1.4


def test_overhead_takes_the_process_beyond_the_work_message_by_message_where_known():
    # Prepare: the medians of process and work come from different messages; per message 0.6 s beyond
    breakdown = {"supernode_poll_wait": 0.1, "clientapp_process": 5.0, "of_which_work": 2.0,
                 "of_which_beyond_the_work": 0.6, "reply_upload": 0.3}
    # Execute / Assert: 0.1 + 0.6 + 0.3
    assert overhead(breakdown) == 1.0


def test_node_memory_samples_the_process_tree_it_is_given():
    # Execute: this process stands for a node
    with NodeMemory({"node": os.getpid()}, interval=0.01) as mem:
        pass
    # Assert: at least this interpreter's resident memory (well over 10 MB)
    assert mem.peak["node"] > 10 * 2**20


def test_a_run_evaluating_with_training_has_one_exchange_per_round_and_a_last_evaluation():
    # Prepare
    separate = parse_config({"federation.rounds": 2})
    fused = parse_config({"federation.rounds": 2, "federation.evaluate-with-train": True})
    # Execute / Assert
    assert exchanges(separate) == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
    assert exchanges(fused) == [(1, "train"), (2, "train"), (2, "evaluate")]


def test_each_arm_is_compared_with_the_simulation_of_its_own_config():
    assert baseline("deployment") == "simulation"
    assert baseline(FUSED + "deployment") == FUSED + "simulation"


def _round(number: int, train_seconds: float, eval_seconds: float):
    from fedlora.common.records import RoundRecord

    return RoundRecord(round=number, connected=1, sampled=["0"], finished=["0"], dropped=[], aggregated=True,
                       checkpoint=None, bytes_down=0, bytes_up=0, seconds=14.0,
                       train={"0": {"train-seconds": train_seconds}}, eval={"0": {"eval-seconds": eval_seconds}})


def test_the_breakdown_times_each_push_from_the_serverapps_own_line_not_the_streams(tmp_path):
    # Prepare: one tenant, one round. The ServerApp begins the train push at 1000.0 s (its line
    # reaches the stream at 1001.0) and has the reply at 1011.0; the evaluate push at 1011.2, the
    # reply at 1014.0. The node receives at 1000.5 / 1011.4, sends at 1010.0 / 1013.0, and its
    # upload succeeds at 1010.6 / 1013.5; the work is 8.0 s / 1.0 s.
    from fedlora.server.grid import EXCHANGE_LINE, utc_stamp
    from fedlora.simulations.bench.deployment import message_breakdown

    def grid_line(stream_at, kind, pushed_at, within):
        return f"{stream_at} INFO :      " + EXCHANGE_LINE % (1, kind, utc_stamp(pushed_at), 0.3, 1, 1, within)

    flower_log = tmp_path / "flower.log"
    flower_log.write_text("\n".join([
        "1001.000 INFO :      Round 1: 1 of 1 tenants sampled",
        grid_line(1011.5, "train", 1000.0, 11.0),
        grid_line(1014.5, "evaluate", 1011.2, 2.8)]) + "\n")
    node_log = tmp_path / "node.log"
    node_log.write_text("\n".join([
        "1000.500 INFO :      Receiving: train message (ID: a)", "1000.600 fedlora-worker INFO took a ClientApp task",
        "1010.000 INFO :      Sending: train message (ID: b)", "1010.600 INFO :      Sent successfully",
        "1011.400 INFO :      Receiving: evaluate message (ID: c)", "1011.500 fedlora-worker INFO took a ClientApp task",
        "1013.000 INFO :      Sending: evaluate message (ID: d)", "1013.500 INFO :      Sent successfully"]) + "\n")
    # Execute
    b = message_breakdown(flower_log, [node_log], [_round(1, 8.0, 1.0)], [(1, "train"), (1, "evaluate")])
    # Assert: medians of the two messages
    assert b["supernode_poll_wait"] == 0.35   # (0.5 + 0.2) / 2
    assert b["of_which_beyond_the_work"] == 1.05  # (9.5 - 8.0 + 1.6 - 1.0) / 2
    assert b["reply_upload"] == 0.55          # (0.6 + 0.5) / 2
    assert b["serverapp_pickup"] == 0.45      # (11.0 - 10.6 + 14.0 - 13.5) / 2
    assert b["serverapp_push"] == 0.3
    assert b["messages"] == 2

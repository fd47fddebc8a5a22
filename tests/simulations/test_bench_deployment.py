"""The deployment benchmark's arithmetic: what counts as a message's overhead, and whose memory."""

from __future__ import annotations

import os

from common.config import parse_config
from simulations.bench.deployment import FUSED, NodeMemory, baseline, exchanges, overhead


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

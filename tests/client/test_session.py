"""The process's cached session applies each run's thread count, also when the model is cached."""

from __future__ import annotations

import torch

from fedlora.client.task import session
from fedlora.common.config import parse_config
from fedlora.common.model import set_threads


def test_cached_session_takes_each_runs_thread_count():
    # Prepare: torch's own count, then a run that loads the model at 1 thread
    set_threads(0)
    default = torch.get_num_threads()
    session(parse_config({"train.threads": 1}))
    assert torch.get_num_threads() == 1
    # Execute: a second run of the same model and adapter (cached), at torch's default
    session(parse_config({"train.threads": 0}))
    # Assert: the default is back, not the first run's 1
    assert torch.get_num_threads() == default

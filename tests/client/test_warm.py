"""The tenant worker's warm-up: what it records, what it loads, and that a bad file costs nothing."""

from __future__ import annotations

import json
import threading

import pytest

from fedlora.client import task, worker_link as link
from fedlora.client.warm import WARM_FILE, loaded_flat, read_warm, warm_keys, warm_up, write_warm
from fedlora.client.worker import Worker
from fedlora.common.config import parse_config


@pytest.fixture
def empty_cache():
    task._MODELS.clear()
    task._DATA.clear()
    yield
    task._MODELS.clear()
    task._DATA.clear()


def test_only_the_keys_that_decide_the_model_are_kept():
    # Prepare
    flat = {"model.base": "embedded", "adapter.r": 4, "train.seed": 3, "train.lr": 0.1, "run.dir": "/x"}
    # Execute / Assert
    assert warm_keys(flat) == {"model.base": "embedded", "adapter.r": 4, "train.seed": 3}


def test_writing_the_same_warm_up_twice_leaves_the_file_alone(tmp_path):
    # Execute
    first = write_warm(tmp_path, {"model.base": "embedded", "train.lr": 0.1})
    second = write_warm(tmp_path, {"model.base": "embedded", "train.lr": 0.5})  # another lr: the same model
    # Assert
    assert (first, second) == (True, False)
    assert json.loads((tmp_path / WARM_FILE).read_text()) == {"model.base": "embedded"}


def test_the_loaded_models_keys_load_the_same_cached_model_again(empty_cache):
    # Prepare: a run with a non-default rank loads its model
    cfg = parse_config({"adapter.r": 4, "train.seed": 11})
    first = task.session(cfg)
    # Execute: what the worker records, parsed back as a warm-up would
    again = task.session(parse_config(loaded_flat()))
    # Assert: the very same cached model, and the recorded keys are the run's
    assert again is first and len(task._MODELS) == 1
    assert loaded_flat() == warm_keys(cfg.to_flat())


def test_nothing_is_recorded_before_a_model_is_loaded(empty_cache):
    assert loaded_flat() is None


def test_warm_up_loads_the_model_the_first_task_then_finds(tmp_path, empty_cache):
    # Prepare
    cfg = parse_config({"adapter.r": 4})
    write_warm(tmp_path, cfg.to_flat())
    # Execute
    result = warm_up(tmp_path / WARM_FILE)
    # Assert: loaded, and a task of that run finds it cached
    assert result["state"] == "loaded" and result["base"] == "embedded"
    loaded = next(iter(task._MODELS.values()))
    assert task.session(cfg) is loaded


@pytest.mark.parametrize("content", ["{not json", json.dumps({"adapter.r": "many"}),
                                     json.dumps({"model.base": "no-such-base"})])
def test_a_warm_up_that_cannot_load_is_reported_and_raises_nothing(tmp_path, empty_cache, content):
    # Prepare
    (tmp_path / WARM_FILE).write_text(content)
    # Execute
    result = warm_up(tmp_path / WARM_FILE)
    # Assert: an unparsable file is as if none were there; a bad config is a failed warm-up
    assert result["state"] == ("none" if content.startswith("{not") else "failed")
    assert not task._MODELS


def test_worker_warms_up_in_the_background_and_records_what_a_run_loads(tmp_path, empty_cache):
    # Prepare: a warm-up file beside the socket
    sock = link.socket_path(tmp_path / "state")
    write_warm(sock.parent, parse_config({"adapter.r": 4}).to_flat())
    worker = Worker(sock, app=object())
    serving = threading.Thread(target=worker.serve_forever, daemon=True)
    serving.start()
    try:
        # Execute: warm up, then a run of another rank loads its own model, as a task would
        worker.start_warm_up().join(timeout=120)
        warm = link.health(sock)["warm"]
        task.session(parse_config({"adapter.r": 2}))
        worker._remember()
    finally:
        worker.close()
    # Assert: health said loaded; the next start warms up with the model served last
    assert warm["state"] == "loaded" and warm["seconds"] >= 0
    assert read_warm(sock.parent / WARM_FILE)["adapter.r"] == 2

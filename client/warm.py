"""What a tenant worker loads before its first task, so that round 1 does not wait for it.

A worker started cold would load the run's base (and, with ``model.precision = nf4``,
quantize it) when the first message arrives, inside round 1 and its timeout. Instead it
warms up when it starts, from ``<state-dir>/worker/warm.json``: the run-config keys that
decide the loaded model (``model.*``, ``adapter.*`` and ``train.seed``).
That file is written

- by ``fedlora deploy supernode --warm SCENARIO``, from the scenario the federation runs;
- by the worker itself whenever a run makes it load another model, so a restarted node
  warms up with what it served last.

Warming is an optimisation only: a file that does not parse, or a base that fails to load,
is logged and the first task loads its model as before (and reports any error there). A run
whose model differs from the warm one simply loads its own, as it would have anyway.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("fedlora.worker")
WARM_FILE = "warm.json"
_SECTIONS = ("model", "adapter")
_TRAIN_KEYS = ("train.seed",)


def warm_keys(flat: dict) -> dict:
    """The keys of a flat run config that decide the model a worker holds loaded."""
    return {k: v for k, v in flat.items() if k.split(".", 1)[0] in _SECTIONS or k in _TRAIN_KEYS}


def write_warm(worker_dir: Path, flat: dict) -> bool:
    """Write the warm-up config (only its model keys); False when the file already says so."""
    from fedlora.common.adapter import write_json_atomic

    keys = warm_keys(flat)
    path = Path(worker_dir) / WARM_FILE
    if read_warm(path) == keys:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, keys)
    return True


def read_warm(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def loaded_flat() -> dict | None:
    """The warm-up keys of the model this process holds (``fedlora.client.task``'s cache), or None."""
    task = sys.modules.get("fedlora.client.task")
    held = list(task._MODELS) if task is not None else []  # a copy: a task may be loading meanwhile
    if not held:
        return None
    from fedlora.common.config import Config, TrainConfig

    model, adapter, seed = held[0]  # the cache key: session()'s
    return warm_keys(Config(model=model, adapter=adapter, train=TrainConfig(seed=seed)).to_flat())


def import_training_path() -> None:
    """Import what a first train or evaluate message would (torch, transformers, PEFT, Opacus'
    accountant), so its time is spent before the node takes tasks."""
    import fedlora.client.handlers  # noqa: F401
    import fedlora.client.lora_rules  # noqa: F401
    import fedlora.client.prox  # noqa: F401
    import fedlora.client.train  # noqa: F401
    import fedlora.common.evaluate  # noqa: F401
    from transformers import get_scheduler  # noqa: F401


def warm_up(path: Path) -> dict:
    """Load the model ``path`` names into ``fedlora.client.task``'s cache. Returns what happened, for
    the worker's health: ``{"state": "none" | "loaded" | "failed", ...}``."""
    flat = read_warm(path)
    if flat is None:
        return {"state": "none"}
    start = time.perf_counter()
    try:
        from fedlora.client.task import session
        from fedlora.common.config import parse_config

        loaded = session(parse_config(flat, source=str(path)))
    except Exception as err:  # noqa: BLE001 - only an optimisation: the first task loads (and reports) it
        log.warning("warm-up from %s failed (the first task will load its model): %s", path, err)
        return {"state": "failed", "error": f"{type(err).__name__}: {err}"}
    seconds = round(time.perf_counter() - start, 2)
    log.info("warmed up %s in %.2f s", flat.get("model.base", "?"), seconds)
    return {"state": "loaded", "base": flat.get("model.base"), "seconds": seconds,
            "device": str(loaded.device)}

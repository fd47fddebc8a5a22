"""``--resume RUN_DIR``: continue an interrupted run with the configuration it was started with.

The ServerApp writes the resolved configuration to ``RUN_DIR/config.json`` before round 1
and a record per complete round (``metrics/round_XXX.json``, with the server's state).
Resuming reads that configuration back, sets ``run.resume=true`` and ``run.dir=RUN_DIR``
and runs the same pipeline again; the ServerApp continues after the last complete round
(:func:`fedlora.server.run.prepare`). The tenants' data directory is the one the run used, so
synthetic tenants are not written again.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fedlora.common.config import Config, parse_config
from fedlora.common.records import read_rounds


class ResumeRefused(ValueError):
    """RUN_DIR cannot be resumed (not a run, or already finished), with what to do instead."""


def resumable(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a complete round to continue after (and is not finished)."""
    root = Path(run_dir)
    return ((root / "metrics" / "round_001.json").is_file() and not (root / "FEDERATION_DONE").exists()
            and not (root / "FEDERATION_FAILED").exists())


def resume_config(run_dir: str | Path) -> Config:
    """The run's own configuration, set to continue ``run_dir``; refuses finished or foreign dirs."""
    root = Path(run_dir).expanduser().resolve()
    config = root / "config.json"
    if not config.is_file():
        raise ResumeRefused(f"{root} has no config.json, so it is not a fedlora run directory that got as far as "
                            "round 1; start a new run instead (fedlora simulate --run-dir ...)")
    if (root / "FEDERATION_DONE").exists():
        raise ResumeRefused(f"the run in {root} is complete (FEDERATION_DONE exists); nothing to resume. "
                            f"Its later stages run on their own: fedlora dpo|merge|publish {shlex.quote(str(root))}")
    if (root / "FEDERATION_FAILED").exists():
        reason = json.loads((root / "FEDERATION_FAILED").read_text() or "{}").get("failure") or "see federation.json"
        raise ResumeRefused(f"the run in {root} ended and failed ({reason}); nothing to resume, start a new run")
    try:
        flat = json.loads(config.read_text())
    except ValueError as err:
        raise ResumeRefused(f"{config} is not valid JSON ({err}); the run cannot be resumed") from None
    # Without a complete round there is nothing to continue after: start it again, same config.
    flat.update({"run.dir": str(root), "run.resume": resumable(root)})
    return parse_config(flat, source=str(config))


def interrupted_message(run_dir: Path, *, command: str) -> str:
    """What Ctrl-C left behind and the exact command that continues it."""
    rounds = read_rounds(run_dir) if (run_dir / "metrics").is_dir() else []
    kept = f"round {rounds[-1].round} is the last complete one (its checkpoint is kept)" if rounds else \
        "no round completed yet"
    return (f"fedlora: interrupted; every process of the run was stopped, {kept}.\n"
            f"resume with: {command} --resume {shlex.quote(str(run_dir))}")

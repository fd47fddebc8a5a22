"""Server-side set-up and wrap-up of a federated run, in plain functions.

``prepare`` makes the run directory, the initial adapter and the strategy's recorder, or,
with ``run.resume``, reads back an interrupted run's last complete round (its record, the
checkpoint of the global adapter after it and the server optimizer's moments beside that
checkpoint); ``finish`` writes the final adapter and a summary, and says when the run does
not count (``federation.min-successful-rounds``). The ServerApp only wires these to Flower.

A round is complete when its record (``metrics/round_XXX.json``, written atomically after
its checkpoint and evaluation) exists; a round interrupted before that is run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.common.adapter import get_state, save_adapter, write_json_atomic
from fedlora.common.config import Config
from fedlora.common.files import app_run_dir, default_run_dir
from fedlora.common.records import SUMMARY_FILE, Drop, FederationSummary, read_rounds
from fedlora.common.model import attach_adapter, base_fingerprint, base_name, load_base
from fedlora.server.records import RoundRecorder


@dataclass
class ServerRun:
    cfg: Config
    run_dir: Path
    initial: dict[str, np.ndarray]
    peft_cfg: object
    base_path: str  # the base's portable name (adapter_config.json), never this machine's path
    base_sha256: str
    recorder: RoundRecorder
    start: dict[str, np.ndarray] | None = None  # the global adapter to start from (resume)
    rounds_done: int = 0                         # complete rounds before this start
    server_state: dict | None = None             # the strategy's state after them
    optimizer_arrays: dict[str, np.ndarray] | None = None  # the server optimizer's moments after them

    def metadata(self, **extra) -> dict:
        return {"fedlora": 1, "base_model": self.cfg.model.base, "base_sha256": self.base_sha256,
                "config": self.cfg.to_flat(), **extra}

    def save(self, path: Path, state, round_number: int, **extra) -> Path:
        return save_adapter(path, state, self.peft_cfg, base_model=self.base_path,
                            metadata=self.metadata(round=round_number, **extra))


def prepare(cfg: Config, *, run_id: int | None = None) -> ServerRun:
    """Run directory, resolved config, the initial global adapter and the recorder.

    With ``run.dir`` empty (a bare ``flwr run``) the run goes to ``<fedlora home>/runs/
    <timestamp>-<run_id>`` (``run_id``: Flower's; None: ``./runs/<timestamp>``), and the
    config the run directory records names it."""
    if not cfg.run.dir:
        run_dir = (default_run_dir() if run_id is None else app_run_dir(run_id)).resolve()
        cfg = cfg.replace(**{"run.dir": str(run_dir)})
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", cfg.to_flat())
    # The server never trains: load the base in fp32 on CPU just to build the adapter.
    base = load_base(cfg.model, for_training=False, precision="fp32" if cfg.model.precision == "nf4"
                     else cfg.model.precision)
    model = attach_adapter(base, cfg.adapter, seed=cfg.train.seed)
    holder: dict = {}
    run = ServerRun(cfg=cfg, run_dir=run_dir, initial=get_state(model),
                    peft_cfg=model.peft_config["default"], base_path=base_name(cfg.model.base),
                    base_sha256=base_fingerprint(cfg.model.base),
                    recorder=RoundRecorder(run_dir, save=lambda p, s, r: holder["run"].save(p, s, r)))
    holder["run"] = run
    if cfg.run.resume:
        return _resume(run)
    run.save(run_dir / "checkpoints" / "round_000", run.initial, 0)
    return run


class ResumeError(RuntimeError):
    """A run directory that cannot be continued, with what to do."""


def _resume(run: ServerRun) -> ServerRun:
    from fedlora.common.adapter import load_adapter_file

    records = read_rounds(run.run_dir)
    if not records or not records[-1].server_state:
        raise ResumeError(f"{run.run_dir} has no complete round with the server's state to resume from; "
                          "start it again without --resume")
    if [r.round for r in records] != list(range(1, len(records) + 1)):
        raise ResumeError(f"{run.run_dir}: round records {[r.round for r in records]} are not consecutive")
    ckpt = next((r.checkpoint for r in reversed(records) if r.checkpoint), "checkpoints/round_000")
    run.start = load_adapter_file(run.run_dir / ckpt)
    run.rounds_done, run.server_state = len(records), records[-1].server_state
    run.optimizer_arrays = optimizer_moments(run.run_dir, run.server_state, run.cfg.federation.server_optimizer)
    run.recorder.resume_from(records)
    for stale in (run.run_dir / SUMMARY_FILE, run.run_dir / "FEDERATION_DONE"):
        stale.unlink(missing_ok=True)
    return run


def optimizer_moments(run_dir: Path, server_state: dict, configured: str) -> dict[str, np.ndarray] | None:
    """The server optimizer's moments that a complete round's ``server_state`` names
    (safetensors, beside its checkpoint), after checking the run used the optimizer the
    config names now (``configured``); None when it has none (sgd, or no step yet)."""
    from safetensors.numpy import load_file

    from fedlora.server.optimizers import resume_mismatch

    saved = server_state.get("optimizer", {})
    why = resume_mismatch(saved, configured)
    if why is not None:
        raise ResumeError(f"{run_dir}: {why}")
    if not saved.get("file"):
        return None
    path = run_dir / saved["file"]
    if not path.resolve().is_relative_to(run_dir.resolve()) or not path.is_file():
        raise ResumeError(f"{run_dir}: the server optimizer's moments {saved['file']} are missing; "
                          "start the run again without --resume")
    return load_file(str(path))


def finish(run: ServerRun, final_state, *, seconds: float, stopped: str | None = None) -> Path:
    """Final adapter and the federated summary (``federation.json``).

    With fewer aggregated rounds than ``federation.min-successful-rounds`` the summary and
    the adapter's metadata carry the failure, and ``FEDERATION_FAILED`` is written instead
    of ``FEDERATION_DONE``: nothing downstream refines, merges or publishes it. ``stopped``: why the
    run ended before its last round (it then fails too)."""
    rounds = run.recorder.rounds
    tenants = sorted({t for r in rounds for t in r.finished if r.aggregated}, key=str)
    aggregated = sum(r.aggregated for r in rounds)
    need = run.cfg.federation.min_successful_rounds
    failure = (f"only {aggregated} of {len(rounds)} round(s) aggregated an update; federation.min-successful-rounds "
               f"is {need}" if aggregated < need else None)
    if stopped:
        failure = f"{stopped}; {failure}" if failure else stopped
    out = run.save(run.run_dir / "adapter", final_state, len(rounds), tenants=len(tenants),
                   aggregated_rounds=aggregated, failure=failure)
    summary = FederationSummary(
        rounds=len(rounds), tenants=tenants, seconds=round(seconds, 2),
        bytes_down=sum(r.bytes_down for r in rounds), bytes_up=sum(r.bytes_up for r in rounds),
        adapter_bytes=int(sum(v.nbytes for v in run.initial.values())),
        dropped=[Drop(node=d.node, tenant=d.tenant, reason=d.reason, round=r.round) for r in rounds for d in r.dropped],
        aggregated_rounds=aggregated, failure=failure, resumed_after=run.rounds_done)
    write_json_atomic(run.run_dir / SUMMARY_FILE, summary.to_json())
    marker = run.run_dir / ("FEDERATION_FAILED" if failure else "FEDERATION_DONE")
    marker.write_text(json.dumps({"adapter": str(out.relative_to(run.run_dir)), "failure": failure}))
    return out

"""``fedlora simulate``: one local multi-tenant run, end to end.

1. resolve the scenario and overrides into one validated config (:mod:`fedlora.simulations.scenario`);
2. write synthetic tenants (unless ``data.dir`` points at real ones);
3. run the *same* ServerApp and ClientApp as a deployment on Flower's simulation engine;
4. train the baselines and evaluate every model on every tenant's holdout;
5. refine the aggregate with DPO, merge it into the fp32 base, publish a signed version;
6. write plots and the report.

Before Flower starts, :mod:`fedlora.simulations.cli.preflight` checks the tenant files, the base
model and the run directory. ``--resume RUN_DIR`` continues an interrupted run after its
last complete round (:mod:`fedlora.simulations.cli.resume`). A federation that aggregated fewer
rounds than ``federation.min-successful-rounds`` (``FEDERATION_FAILED``) gets a report that
says why and nothing else: no baselines, DPO, merge or publish (exit code 1). Ctrl-C stops
every process of the run, keeps the last checkpoint and prints the resume command (130).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from fedlora.common.config import Config
from fedlora.common.files import write_json_atomic
from fedlora.common.records import RoundRecord, read_rounds, read_summary, round_path
from fedlora.simulations.scenario import parse_overrides, resolve, write_run_config


class FederationFailed(RuntimeError):
    """The federation aggregated too little to count (``FEDERATION_FAILED``); nothing was published."""


class RoundProgress:
    """A progress bar over rounds, fed by the Flower log lines."""

    _round = re.compile(r"\[ROUND (\d+)/(\d+)\]")

    def __init__(self, rounds: int, run_dir: Path, *, done: int = 0, lag: int = 0) -> None:
        """``lag``: rounds a round's line waits for its record to be complete (1 where the next
        round's training messages evaluate it, ``federation.evaluate-with-train``)."""
        from tqdm.auto import tqdm

        self.run_dir, self.lag = run_dir, lag
        self.printed = done
        self.bar = tqdm(total=rounds, initial=done, desc="federated rounds", unit="round")
        self.phase = "starting Flower simulation"
        self.bar.set_postfix_str(self.phase)
        self.done = self.offset = done  # a resumed run: Flower counts its remaining rounds from 1

    def __call__(self, line: str) -> None:
        m = self._round.search(line)
        if m:
            k = int(m.group(1)) + self.offset
            self._finish_upto(k - 1)
            self.bar.set_postfix_str(f"round {k}: training")
        elif "configure_evaluate" in line or "aggregate_evaluate" in line:
            self.bar.set_postfix_str(f"round {self.done + 1}: evaluating")
        elif "dropped" in line:
            self.bar.write(line.split("]", 1)[-1].strip() if "]" in line else line)
        elif "Traceback" in line or "ERROR" in line:
            self.bar.write(line)

    def _finish_upto(self, k: int, *, lag: int | None = None) -> None:
        while self.done < k:
            self.done += 1
            self.bar.update(1)
        while self.printed < k - (self.lag if lag is None else lag):
            self.printed += 1
            path = round_path(self.run_dir, self.printed)
            if path.is_file():
                r = RoundRecord.from_json(json.loads(path.read_text()))
                ems = r.eval_exact_match()
                self.bar.write(f"round {self.printed}: {len(r.finished)}/{len(r.sampled)} tenants finished"
                               + (f", mean holdout EM {100 * sum(ems) / len(ems):.1f} %" if ems else "")
                               + (f", {len(r.dropped)} dropped" if r.dropped else ""))

    def close(self, rounds: int) -> None:
        self._finish_upto(rounds, lag=0)
        self.bar.close()


def simulate(cfg: Config, *, http_port: int = 0, control_port: int = 0) -> Path:
    """Run the whole job; returns the report path."""
    from fedlora.simulations.cli.memory import PeakTreeMemory
    from fedlora.simulations.cli.preflight import check_simulation

    check_simulation(cfg)  # before anything heavy is imported, written or started
    from fedlora.common.model import set_threads

    set_threads(cfg.train.threads)  # baselines, evaluation, DPO and merge run in this process
    with PeakTreeMemory() as memory:
        report = _simulate(cfg, http_port=http_port, control_port=control_port, memory=memory)
    return report


def _simulate(cfg: Config, *, http_port: int, control_port: int, memory) -> Path:
    from fedlora.simulations.baselines import compare
    from fedlora.simulations.cli.launcher import run_simulation
    from fedlora.server.release.stages import run_stages
    from fedlora.simulations.release import release_inputs, report_sections
    from fedlora.simulations.report import plot, write_report
    from fedlora.simulations.synthetic import write_tenants

    t0 = time.perf_counter()
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if not cfg.data.dir:
        data_dir = run_dir / "data"
        write_tenants(data_dir, num_tenants=cfg.simulation.tenants, train_size=cfg.data.train_size,
                      holdout_size=cfg.data.holdout_size, own_fraction=cfg.data.own_fraction,
                      preference_size=cfg.data.preference_size, seed=cfg.data.seed)
        cfg = cfg.replace(**{"data.dir": str(data_dir)})
    data_dir = Path(cfg.data.dir)
    rc = write_run_config(cfg, run_dir / "run_config.toml")
    print(f"fedlora: run directory {run_dir}" + (" (resumed)" if cfg.run.resume else ""), flush=True)

    progress = RoundProgress(cfg.federation.rounds, run_dir, done=len(read_rounds(run_dir)) if cfg.run.resume else 0,
                             lag=int(cfg.federation.evaluate_with_train))
    t = time.perf_counter()
    try:
        run_simulation(rc, state_dir=run_dir / "flower", num_supernodes=cfg.simulation.tenants,
                       cpus_per_client=cfg.simulation.cpus_per_tenant, http_port=http_port,
                       control_port=control_port, on_line=progress,
                       timeout=cfg.federation.round_timeout * cfg.federation.rounds * 3 + 600)
    finally:
        progress.close(cfg.federation.rounds if (run_dir / "FEDERATION_DONE").exists() else progress.done)
    if (run_dir / "FEDERATION_FAILED").exists():
        _report_failure(cfg, run_dir)
    if not (run_dir / "FEDERATION_DONE").exists():
        raise RuntimeError(f"the federated run ended without a final adapter; see {run_dir / 'flower' / 'flower.log'}")
    timings["federated_seconds"] = time.perf_counter() - t

    fed = read_summary(run_dir)
    tenant_rounds = sum(len(r.finished) for r in read_rounds(run_dir))
    tenants = list(range(cfg.simulation.tenants))
    t = time.perf_counter()
    comparison = compare(cfg, run_dir, data_dir, tenants, rounds_done=fed.rounds,
                         total_tenant_rounds=tenant_rounds, with_baselines=cfg.run.baselines)
    timings["baselines_and_evaluation_seconds"] = time.perf_counter() - t
    write_json_atomic(run_dir / "comparison.json", comparison)
    plot(run_dir)
    t = time.perf_counter()
    release = run_stages(cfg, run_dir, release_inputs(cfg, run_dir))  # DPO -> fp32 merge -> signed publish
    timings["dpo_merge_publish_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - t0
    timings["peak_memory_gb"] = memory.peak_bytes / 2**30
    write_json_atomic(run_dir / "timings.json", timings)
    if cfg.privacy.mode != "none" and cfg.privacy.compare_without_dp:  # the report's quality with vs without DP
        _without_dp(cfg, run_dir / "without_dp")
    report = write_report(run_dir, cfg, comparison=comparison, extra_sections=[
        *report_sections(release),
        "## Time and memory", "", *[f"- {k.replace('_', ' ')}: {v:.2f}" for k, v in timings.items()],
        "", "Peak memory is the summed resident memory of the whole process tree (SuperLink, Ray workers, "
        "ClientApps, this process), sampled every 0.5 s.", ""])
    return report


def _without_dp(cfg: Config, out: Path) -> None:
    """The same run without DP, for the report's comparison; a resumed run resumes it too."""
    from fedlora.simulations.cli.resume import resumable

    if (out / "FEDERATION_DONE").exists() and (out / "report.md").exists():
        return
    simulate(cfg.replace(**{"privacy.mode": "none", "run.baselines": False, "dpo.enabled": False,
                            "publish.enabled": False, "run.dir": str(out), "run.resume": resumable(out),
                            # its clear releases are not the tenants': they go to ledgers of its own
                            "simulation.ledger-dir": str(out / "ledgers")}))


def _report_failure(cfg: Config, run_dir: Path) -> None:
    """A failed federation: a report that says why, then :class:`FederationFailed`."""
    from fedlora.server.release.tables import md_text
    from fedlora.simulations.report import plot, write_report

    fed = read_summary(run_dir)
    reason = (fed.failure if fed and fed.failure else "FEDERATION_FAILED written by the ServerApp")
    plot(run_dir)
    write_report(run_dir, cfg, comparison=[], extra_sections=[
        "## Nothing published", "",
        f"The federation failed: {md_text(reason)}. No baselines, DPO, merge or publish ran; "
        "`fedlora merge` and `fedlora publish` refuse this run's adapter.", ""])
    raise FederationFailed(f"the federation failed: {reason}; nothing was refined, merged or published "
                           f"(report: {run_dir / 'report.md'})")


def main_simulate(args) -> int:
    from fedlora.simulations.cli.resume import resume_config

    if args.resume:
        if args.set or args.run_dir or args.scenario != "default":
            print("fedlora simulate: --resume continues a run with its own config.json; drop --scenario, --set "
                  "and --run-dir", file=sys.stderr)
            return 2
        cfg = resume_config(args.resume)
    else:
        cfg = resolve(args.scenario, parse_overrides(args.set or []), args.run_dir)
    run_dir = Path(cfg.run.dir)
    try:
        with _sigterm_as_interrupt():
            report = simulate(cfg, http_port=args.port, control_port=args.control_port)
    except KeyboardInterrupt:
        from fedlora.simulations.cli.resume import interrupted_message

        print(interrupted_message(run_dir, command="fedlora simulate"), file=sys.stderr, flush=True)
        return 130
    except FederationFailed as err:
        print(f"fedlora simulate: {err}", file=sys.stderr)
        return 1
    print(f"fedlora: report written to {report}")
    return 0


class _sigterm_as_interrupt:
    """SIGTERM takes the same clean way out as Ctrl-C (every process stopped, resume printed)."""

    def __enter__(self):
        import signal

        def handler(signum, frame):
            raise KeyboardInterrupt

        self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGTERM, self._old)
        return False

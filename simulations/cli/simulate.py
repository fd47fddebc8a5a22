"""``fedlora simulate``: one local multi-tenant run, end to end.

1. resolve the scenario and overrides into one validated config (:mod:`simulations.scenario`);
2. write synthetic tenants (unless ``data.dir`` points at real ones);
3. run the *same* ServerApp and ClientApp as a deployment on Flower's simulation engine;
4. train the baselines and evaluate every model on every tenant's holdout;
5. refine the aggregate with DPO, merge it into the fp32 base, publish a signed version;
6. write plots and the report.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from common.config import Config, ConfigError
from common.files import write_json_atomic
from common.records import RoundRecord, read_rounds, read_summary, round_path
from simulations.scenario import parse_overrides, resolve, write_run_config


class RoundProgress:
    """A progress bar over rounds, fed by the Flower log lines."""

    _round = re.compile(r"\[ROUND (\d+)/(\d+)\]")

    def __init__(self, rounds: int, run_dir: Path) -> None:
        from tqdm.auto import tqdm

        self.run_dir = run_dir
        self.bar = tqdm(total=rounds, desc="federated rounds", unit="round")
        self.phase = "starting Flower simulation"
        self.bar.set_postfix_str(self.phase)
        self.done = 0

    def __call__(self, line: str) -> None:
        m = self._round.search(line)
        if m:
            k = int(m.group(1))
            self._finish_upto(k - 1)
            self.bar.set_postfix_str(f"round {k}: training")
        elif "configure_evaluate" in line or "aggregate_evaluate" in line:
            self.bar.set_postfix_str(f"round {self.done + 1}: evaluating")
        elif "dropped" in line:
            self.bar.write(line.split("]", 1)[-1].strip() if "]" in line else line)
        elif "Traceback" in line or "ERROR" in line:
            self.bar.write(line)

    def _finish_upto(self, k: int) -> None:
        while self.done < k:
            self.done += 1
            path = round_path(self.run_dir, self.done)
            if path.is_file():
                r = RoundRecord.from_json(json.loads(path.read_text()))
                ems = r.eval_exact_match()
                self.bar.write(f"round {self.done}: {len(r.finished)}/{len(r.sampled)} tenants finished"
                               + (f", mean holdout EM {100 * sum(ems) / len(ems):.1f} %" if ems else "")
                               + (f", {len(r.dropped)} dropped" if r.dropped else ""))
            self.bar.update(1)

    def close(self, rounds: int) -> None:
        self._finish_upto(rounds)
        self.bar.close()


def simulate(cfg: Config, *, http_port: int = 0, control_port: int = 0) -> Path:
    """Run the whole job; returns the report path."""
    from simulations.cli.memory import PeakTreeMemory

    with PeakTreeMemory() as memory:
        report = _simulate(cfg, http_port=http_port, control_port=control_port, memory=memory)
    return report


def _simulate(cfg: Config, *, http_port: int, control_port: int, memory) -> Path:
    from simulations.baselines import compare
    from simulations.cli.launcher import run_simulation
    from server.release.stages import run_stages
    from simulations.release import release_inputs, report_sections
    from simulations.report import plot, write_report
    from simulations.synthetic import write_tenants

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
    print(f"fedlora: run directory {run_dir}", flush=True)

    progress = RoundProgress(cfg.federation.rounds, run_dir)
    t = time.perf_counter()
    try:
        run_simulation(rc, state_dir=run_dir / "flower", num_supernodes=cfg.simulation.tenants,
                       cpus_per_client=cfg.simulation.cpus_per_tenant, http_port=http_port,
                       control_port=control_port, on_line=progress,
                       timeout=cfg.federation.round_timeout * cfg.federation.rounds * 3 + 600)
    finally:
        progress.close(cfg.federation.rounds if (run_dir / "FEDERATION_DONE").exists() else progress.done)
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
        simulate(cfg.replace(**{"privacy.mode": "none", "run.baselines": False, "dpo.enabled": False,
                                "publish.enabled": False, "run.dir": str(run_dir / "without_dp")}))
    report = write_report(run_dir, cfg, comparison=comparison, extra_sections=[
        *report_sections(release),
        "## Time and memory", "", *[f"- {k.replace('_', ' ')}: {v:.2f}" for k, v in timings.items()],
        "", "Peak memory is the summed resident memory of the whole process tree (SuperLink, Ray workers, "
        "ClientApps, this process), sampled every 0.5 s.", ""])
    return report


def main_simulate(args) -> int:
    try:
        cfg = resolve(args.scenario, parse_overrides(args.set or []), args.run_dir)
    except (ConfigError, FileNotFoundError) as err:
        print(f"fedlora simulate: {err}", file=sys.stderr)
        return 2
    report = simulate(cfg, http_port=args.port, control_port=args.control_port)
    print(f"fedlora: report written to {report}")
    return 0

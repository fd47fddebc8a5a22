"""One tenant of four misbehaves: does the federation survive it?

``python -m fedlora.simulations.attacks.harness`` runs the default scenario through the real
ServerApp on Flower's simulation engine, once without an attacker and once per attack,
each under the server settings named: the defaults (bounds and the direction screen on),
``flag-only`` (the screen only flags) and ``fedavg-no-bounds`` (every bound off, the screen
only flags). The attacker is tenant 3; its ClientApp is fedlora's own, wrapped
(:mod:`fedlora.simulations.attacks.hostile_app`), or, for ``label-flip``, fedlora's own on a
training file whose answers are another domain's. The final adapter is scored on the
honest tenants' holdouts, and the table says whether the attacker was flagged.

Attacks: scale (delta x100), sign-flip (x-10), noise (Gaussian at 10x the honest norm),
max-examples (the largest example count the server accepts), label-flip, and the ones that stay
under every norm bound: flip-1, flip-2, flip-2.9 (sign-flipped at 1, 2 and 2.9 x its own norm,
about the round's median; the default bound is 3x) and shift (each coordinate moved by its own
magnitude, one fixed way every round, "a little is enough").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path

ATTACKS = ("none", "scale", "sign-flip", "noise", "max-examples", "label-flip", "flip-1", "flip-2", "flip-2.9", "shift")
SETTINGS = {
    "defaults": {},
    "flag-only": {"federation.outlier-action": "flag"},  # the direction screen only reports
    "fedavg-no-bounds": {"federation.aggregator": "fedavg", "federation.norm-multiplier": 0.0,
                          "federation.max-update-norm": 0.0, "federation.weight-multiplier": 0.0,
                          "federation.outlier-action": "flag"},
}
ATTACKER = 3


def hostile_app_dir() -> Path:
    """An app directory like the installed fedlora's, whose ClientApp is the hostile wrapper."""
    from fedlora.simulations.cli.flower_app import app_dir

    return app_dir(clientapp="fedlora.simulations.attacks.hostile_app:app")


def label_flip(data_dir: Path, out_dir: Path, *, tenant: int, seed: int = 0) -> Path:
    """A copy of the tenants in which ``tenant``'s training answers belong to other rows of
    another tenant's data (the honest protocol on poisoned data)."""
    from fedlora.common.data import tenant_paths

    shutil.copytree(data_dir, out_dir, dirs_exist_ok=True)
    train = tenant_paths(out_dir, tenant)[0]
    other = tenant_paths(out_dir, (tenant + 1) % 4)[0]
    answers = [json.loads(line)["output"] for line in other.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    for row in rows:
        row["output"] = rng.choice(answers)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def honest_em(cfg, run_dir: Path, data_dir: Path) -> dict[str, float]:
    """Exact match of the run's final adapter on each honest tenant's holdout."""
    from fedlora.common.adapter import load_adapter_file, set_state
    from fedlora.common.data import read_examples, tenant_paths
    from fedlora.common.evaluate import evaluate
    from fedlora.common.model import load_model
    from fedlora.common.templates import make_format

    loaded = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed, for_training=False)
    set_state(loaded.model, load_adapter_file(run_dir / "adapter"))
    fmt = make_format(cfg.data, loaded.tokenizer)
    return {str(t): evaluate(loaded.model, loaded.tokenizer, read_examples(tenant_paths(data_dir, t)[1]), cfg.eval,
                             max_length=cfg.data.max_length, device=loaded.device, template=fmt).exact_match
            for t in range(cfg.simulation.tenants) if t != ATTACKER}


def run_one(base_cfg, attack: str, setting: str, *, root: Path, data_dir: Path, app_dir: Path) -> dict:
    from fedlora.common.records import read_rounds
    from fedlora.simulations.cli.launcher import run_simulation
    from fedlora.simulations.scenario import write_run_config

    name = f"{attack}__{setting}"
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data = label_flip(data_dir, root / "data_label_flip", tenant=ATTACKER) if attack == "label-flip" else data_dir
    cfg = base_cfg.replace(**{**SETTINGS[setting], "run.dir": str(run_dir), "data.dir": str(data)})
    rc = write_run_config(cfg, run_dir / "run_config.toml")
    env = {"FEDLORA_ATTACK": attack if attack != "label-flip" else "none", "FEDLORA_ATTACKER": str(ATTACKER),
           "FEDLORA_MAX_EXAMPLES": str(cfg.federation.max_examples)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the simulation's processes inherit it
    t = time.perf_counter()
    try:
        run_simulation(rc, state_dir=run_dir / "flower", num_supernodes=cfg.simulation.tenants,
                       cpus_per_client=cfg.simulation.cpus_per_tenant, app_dir=app_dir,
                       timeout=cfg.federation.round_timeout * cfg.federation.rounds * 3 + 600)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - t
    rounds = read_rounds(run_dir)
    em = honest_em(cfg, run_dir, data_dir)  # scored on the honest holdouts (never flipped)
    who = str(ATTACKER)
    flagged = sum(1 for r in rounds if who in r.audit and r.audit[who].outlier)
    actions = [r.audit[who].action for r in rounds if who in r.audit]
    shares = [r.audit[who].weight_share for r in rounds if who in r.audit]
    honest_flags = sum(1 for r in rounds for t, a in r.audit.items() if t != who and a.outlier)
    honest_dropped = sum(1 for r in rounds for t, a in r.audit.items() if t != who and a.action == "dropped")
    ratios = [r.audit[who].norm / statistics.median(a.norm for a in r.audit.values())
              for r in rounds if who in r.audit and len(r.audit) > 1]
    return {"attack": attack, "setting": setting, "honest_em": em, "mean_honest_em": statistics.mean(em.values()),
            "rounds": len(rounds), "aggregated": sum(r.aggregated for r in rounds), "attacker_flagged": flagged,
            "attacker_actions": {a: actions.count(a) for a in sorted(set(actions))},
            "attacker_weight_share": round(statistics.mean(shares), 3) if shares else 0.0,
            "honest_flags": honest_flags, "honest_dropped": honest_dropped,
            "attacker_norm_x_median": round(statistics.mean(ratios), 2) if ratios else 0.0,
            "server_seconds": round(statistics.median(r.aggregation.get("server_seconds", 0.0) for r in rounds), 4),
            "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    base = {r["setting"]: r["mean_honest_em"] for r in rows if r["attack"] == "none"}
    lines = ["| attack | server | honest mean EM % | vs no attacker | attacker flagged (rounds) | "
             "attacker's treatment | attacker norm / median | attacker weight share | honest flagged (dropped) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["mean_honest_em"] / base[r["setting"]] if base.get(r["setting"]) else float("nan")
        acts = ", ".join(f"{k} {v}" for k, v in r["attacker_actions"].items())
        lines.append(f"| {r['attack']} | {r['setting']} | {100 * r['mean_honest_em']:.1f} | {ratio:.3f} | "
                     f"{r['attacker_flagged']}/{r['rounds']} | {acts} | {r.get('attacker_norm_x_median', 0):.2f} | "
                     f"{r['attacker_weight_share']:.2f} | {r['honest_flags']} ({r.get('honest_dropped', 0)}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fedlora.common.offline import quiet_and_offline
    from fedlora.simulations.scenario import parse_overrides, resolve
    from fedlora.simulations.synthetic import write_tenants

    quiet_and_offline()
    ap = argparse.ArgumentParser(prog="python -m fedlora.simulations.attacks.harness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/attacks"), help="where the runs and the table go")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated subset of {', '.join(ATTACKS)}")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {', '.join(SETTINGS)}")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="run-config override (repeatable)")
    args = ap.parse_args(argv)
    root = args.out.resolve()
    attacks = [a for a in args.attacks.split(",") if a]
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(settings) - set(SETTINGS)) + sorted(set(attacks) - set(ATTACKS))
    if unknown:
        ap.error(f"unknown attack or setting: {', '.join(unknown)}")
    cfg = resolve("default", {"run.baselines": False, "dpo.enabled": False, "publish.enabled": False,
                              **parse_overrides(args.set or [])}, str(root / "base"))
    data_dir = root / "data"
    write_tenants(data_dir, num_tenants=cfg.simulation.tenants, train_size=cfg.data.train_size,
                  holdout_size=cfg.data.holdout_size, own_fraction=cfg.data.own_fraction,
                  preference_size=cfg.data.preference_size, seed=cfg.data.seed)
    app_dir = hostile_app_dir()
    rows = []
    for setting in settings:
        for attack in attacks:
            row = run_one(cfg, attack, setting, root=root, data_dir=data_dir, app_dir=app_dir)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (root / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    (root / "table.md").write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

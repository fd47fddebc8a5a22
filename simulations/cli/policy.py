"""``fedlora policy init|check|fingerprint``: write, validate and pin a tenant's own privacy policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_command(sub) -> None:
    pol = sub.add_parser("policy", help="a tenant's own privacy policy: init, check, fingerprint a base",
                         description="A tenant policy is a TOML file the tenant owns; a node started with "
                                     "`fedlora deploy supernode --policy FILE` declines every task that breaks "
                                     "it, whatever the server's run config says (README, section Tenant policy).")
    cmds = pol.add_subparsers(dest="policy_command", required=True, metavar="STEP")
    init = cmds.add_parser("init", help="write a commented default policy")
    init.add_argument("file", help="where to write it, e.g. policy.toml")
    init.add_argument("--base", action="append", default=[], metavar="BASE",
                      help="a model.base this node accepts, pinned by its fingerprint (repeatable; default: "
                           "the embedded base)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    check = cmds.add_parser("check", help="validate a policy (and, with --data, against a training file)")
    check.add_argument("file")
    check.add_argument("--data", help="the tenant's training JSONL: its delta must be at most 1 / records")
    fp = cmds.add_parser("fingerprint", help="print a base's fingerprint line for the policy's [bases] table")
    fp.add_argument("base", help="'embedded', a local Hugging Face directory, or a cached hub id")


def _base_line(base: str) -> tuple[str, str]:
    from fedlora.client.policy_check import fingerprint

    return base, f"sha256:{fingerprint(base)}"


def main_policy(args: argparse.Namespace) -> int:
    from fedlora.client.policy import PolicyError, default_text, load_policy

    if args.policy_command == "fingerprint":
        name, value = _base_line(args.base)
        print(f'"{name}" = "{value}"')
        return 0
    path = Path(args.file)
    if args.policy_command == "init":
        if path.exists() and not args.force:
            print(f"fedlora policy init: {path} exists; pass --force to overwrite it", file=sys.stderr)
            return 2
        bases = dict(_base_line(b) for b in (args.base or ["embedded"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(default_text(bases=bases), encoding="utf-8")
        print(f"wrote {path}; check it with `fedlora policy check {path} --data train.jsonl`")
        return 0
    try:
        policy = load_policy(path)
    except PolicyError as err:
        raise _CheckFailed(str(err)) from None
    problems = []
    if args.data:
        from fedlora.client.policy import data_problems
        from fedlora.client.policy_mod import count_records

        problems = data_problems(policy, count_records(Path(args.data)))
    if problems:
        raise _CheckFailed(f"{len(problems)} problem(s) in {path} for {args.data}:\n" +
                           "\n".join(f"  - {p}" for p in problems))
    pr = policy.privacy
    print(f"{path}: valid. privacy mode {pr.mode}, delta {pr.delta:g}, epsilon <= {pr.max_epsilon_per_run:g} per "
          f"run and {pr.lifetime_epsilon:g} in all, noise >= {pr.min_noise_multiplier:g}, batch >= "
          f"{pr.min_batch_size}; secure aggregation {'required' if policy.secagg.required else 'optional'}; "
          f"{len(policy.bases) or 'any'} base(s); {policy.evaluation.max_per_run} evaluations per run, "
          f"{policy.evaluation.max_lifetime} in all; "
          f"errors: {policy.reply.errors}; ledgers in {policy.ledger_dir()}")
    if not policy.bases:
        print("note: [bases] is empty, so the server may point model.base at any model on this node")
    return 0


class _CheckFailed(ValueError):
    """The policy does not hold (the CLI prints it and exits 2)."""

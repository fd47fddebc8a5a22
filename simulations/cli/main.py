"""The ``fedlora`` command line: the outer layer; nothing imports it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlora.common.offline import quiet_and_offline

# Errors a user can fix from the message alone (bad input, missing file, a refused step):
# one line (or one per problem), exit code 2, no traceback unless --debug. Matched by class
# name so that checking does not import the modules that define them.
USER_ERRORS = frozenset({"ConfigError", "DataError", "PreflightError", "ResumeError", "ResumeRefused", "SourceError",
                         "PublishError", "ManifestError", "ModelNotFoundError", "DeploymentConfigError",
                         "TenantConfigError", "SafetensorError",
                         "BaseImportError", "BaseMismatchError", "PolicyError"})
# A run that started and did not finish: its message, exit code 1.
RUN_ERRORS = frozenset({"SimulationError", "DeploymentError", "MergeMismatch"})

EPILOG = """\
examples:
  fedlora simulate                          # default scenario: 4 synthetic tenants, embedded tiny base
  fedlora simulate --scenario non_iid       # a shipped scenario (see simulations/scenarios/)
  fedlora simulate --set federation.rounds=2 --set adapter.r=16
  fedlora config                            # every run-config key, its default and meaning
  fedlora flwr-config                       # connections for Flower's own CLI; prints the flwr run line
  fedlora import-base SmolLM2-135M-Instruct.Q4_1.gguf --out bases/smollm2   # a real base from a GGUF
  fedlora keys signing --out keys/          # Ed25519 key pair for signing published versions
  fedlora keys node hospital-a --out keys/  # SuperNode authentication key pair
  fedlora certs --out certs/ --host 127.0.0.1 --host superlink.example.org
  fedlora policy init policy.toml           # a tenant's own privacy policy (then: policy check)
  fedlora deploy supernode --superlink superlink.example.org:9093 --ca ca.crt --key keys/hospital-a \
      --data /data/train.jsonl --policy policy.toml   # a tenant joins (README, section Deployment)
  fedlora dpo runs/20260101-120000          # DPO-refine a run's aggregate (also: merge, publish)
  fedlora publish runs/x --registry registry/ --signing-key keys/fedlora-signing.key
  fedlora verify registry/model/v1 --public-key keys/fedlora-signing.pub
  fedlora simulate --resume runs/20260101-120000   # continue an interrupted run after its last round
  fedlora --debug merge runs/x              # any command: show the full traceback of an error
"""


def _cmd_config(args) -> int:
    from fedlora.common.config import describe

    for key, default, text in describe():
        print(f"{key:32} {default!r:>14}  {text}")
    return 0


def _cmd_keys(args) -> int:
    from fedlora.common.credentials import write_node_keypair, write_signing_keypair

    if args.kind == "signing":
        priv, pub = write_signing_keypair(args.out, name=args.name or "fedlora-signing", force=args.force)
    else:
        if not args.name:
            print("fedlora keys node: give the node's NAME, e.g. `fedlora keys node hospital-a`", file=sys.stderr)
            return 2
        priv, pub = write_node_keypair(args.out, args.name, force=args.force)
    print(f"private key (mode 0600, keep it on this machine): {priv}\npublic key: {pub}")
    return 0


def _cmd_certs(args) -> int:
    from fedlora.common.tls import write_tls_certificates

    # the SuperLink itself listens on loopback behind its Fleet proxy, which checks it as "localhost"
    hosts = tuple(dict.fromkeys([*(args.host or []), "127.0.0.1", "localhost"]))
    paths = write_tls_certificates(args.out, hosts=hosts, days=args.days, force=args.force)
    for role, path in paths.items():
        print(f"{role:12} {path}")
    if not args.host:
        print("note: the certificate names only 127.0.0.1 and localhost; tenants on other hosts need "
              "--host <address they dial>", file=sys.stderr)
    return 0


def _cmd_verify(args) -> int:
    from fedlora.server.release.manifest import verify_version

    result = verify_version(args.path, args.public_key)
    if result.ok:
        print(f"verified: {result.files_checked} files match the signed manifest")
        if args.base:
            from fedlora.common.model import require_base
            from fedlora.server.release.manifest import read_metadata

            meta = read_metadata(args.path)
            require_base(str(meta.get("base_model") or args.base), meta.get("base_sha256"), override=args.base,
                         what=f"{args.path}")
            print(f"base {args.base} has the recorded fingerprint {meta.get('base_sha256')}")
        return 0
    print(f"verification FAILED for {args.path}:", file=sys.stderr)
    for problem in result.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    from fedlora.simulations.scenario import shipped_scenarios

    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated, privacy-preserving LoRA/QLoRA fine-tuning on Flower. Tenants train locally; "
                    "only adapter deltas travel; the server aggregates them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="run a local multi-tenant federation on Flower's simulation engine",
                         description="Run the fedlora ServerApp and ClientApps on Flower's simulation engine with "
                                     "synthetic tenants, then train baselines, evaluate every model on every "
                                     "tenant's holdout and write a report with plots.")
    sim.add_argument("--scenario", default="default",
                     help=f"a shipped scenario ({', '.join(shipped_scenarios())}) or a .toml path (default: default)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override one run-config key (repeatable); `fedlora config` lists the keys")
    sim.add_argument("--run-dir", help="where to write the run (default: ./runs/<timestamp>)")
    sim.add_argument("--port", type=int, default=0, help="SuperLink HTTP port (default: a free port)")
    sim.add_argument("--control-port", type=int, default=0, help="SuperLink control port (default: a free port)")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run after its last complete round, with its own config.json")

    sub.add_parser("config", help="list every run-config key with its default and meaning")

    keys = sub.add_parser("keys", help="make a key pair: 'signing' (Ed25519) or 'node NAME' (SuperNode auth)")
    keys.add_argument("kind", choices=("signing", "node"))
    keys.add_argument("name", nargs="?", help="node name (for 'node'), or the signing key's file name")
    keys.add_argument("--out", default="keys", help="directory for the key files (default: keys/)")
    keys.add_argument("--force", action="store_true", help="overwrite existing key files")

    certs = sub.add_parser("certs", help="make a CA and a SuperLink TLS certificate")
    certs.add_argument("--out", default="certs", help="directory for the certificates (default: certs/)")
    certs.add_argument("--host", action="append", help="a name or IP the tenants reach the SuperLink at (repeatable; "
                       "127.0.0.1 and localhost are always included: the SuperLink itself listens there)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")

    ver = sub.add_parser("verify", help="check a published version's hashes and signature")
    ver.add_argument("path", help="the version directory (<registry>/<name>/<version>)")
    ver.add_argument("--public-key", required=True, help="the publisher's Ed25519 public key (PEM)")
    ver.add_argument("--base", metavar="PATH", help="also check that the base model directory on this machine has "
                                                 "the fingerprint the version records")

    from fedlora.simulations.cli.import_base import add_command as add_import_command

    add_import_command(sub)

    from fedlora.simulations.cli.deploy import add_commands as add_deploy_commands

    add_deploy_commands(sub)

    from fedlora.simulations.cli.release import add_commands as add_release_commands

    add_release_commands(sub)

    from fedlora.simulations.cli.flwr_config import add_command as add_flwr_config_command

    add_flwr_config_command(sub)

    from fedlora.simulations.cli.policy import add_command as add_policy_command

    add_policy_command(sub)
    return parser


# What a missing or unreadable file raises: the user's to fix, like the errors above.
FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _kind(err: BaseException) -> str | None:
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & USER_ERRORS or isinstance(err, FILE_ERRORS):
        return "user"
    if names & RUN_ERRORS:
        return "run"
    if isinstance(err, (OSError, ValueError)):
        # fedlora's own raise says what to change; one from inside a library may be a defect
        return "user" if _raised_here(err) else "unexpected"
    return None


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by fedlora's own code (its last frame is in the package)."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    root = Path(__file__).resolve().parents[2]  # the package: simulations/cli/main.py is inside it
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(root) and \
        not Path(frames[-1].filename).resolve().is_relative_to(root / "tests")


def _origin(err: BaseException) -> str:
    """``file.py:LINE in function``, where ``err`` was raised."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return type(err).__name__
    last = frames[-1]
    return f"{type(err).__name__} at {Path(last.filename).name}:{last.lineno} in {last.name}"


def _command(args) -> str:
    sub = getattr(args, "deploy_command", None)
    return f"fedlora {args.command}" + (f" {sub}" if args.command == "deploy" and sub else "")


def main(argv: list[str] | None = None) -> int:
    quiet_and_offline()  # before any Flower / Hugging Face module reads its switches
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except Exception as err:
        kind = _kind(err)
        if args.debug or kind is None:
            raise
        name = _command(args)
        for line in str(err).splitlines() or [type(err).__name__]:
            print(line if line.startswith("  ") else f"{name}: {line}", file=sys.stderr)
        if kind == "unexpected":
            print(f"{name}: ({_origin(err)}; if the message does not say what to change, rerun with --debug "
                  "for the traceback and report it)", file=sys.stderr)
        return 1 if kind == "run" else 2


def _dispatch(args) -> int:
    if args.command == "simulate":
        from fedlora.simulations.cli.simulate import main_simulate

        return main_simulate(args)
    if args.command == "deploy":
        from fedlora.simulations.cli.deploy import main_deploy

        return main_deploy(args)
    if args.command == "import-base":
        from fedlora.simulations.cli.import_base import main_import_base

        return main_import_base(args)
    if args.command == "flwr-config":
        from fedlora.simulations.cli.flwr_config import main_flwr_config

        return main_flwr_config(args)
    if args.command == "policy":
        from fedlora.simulations.cli.policy import main_policy

        return main_policy(args)
    if args.command in ("dpo", "merge", "publish"):
        from fedlora.simulations.cli.release import main_release

        return main_release(args)
    return {"config": _cmd_config, "keys": _cmd_keys, "certs": _cmd_certs, "verify": _cmd_verify}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

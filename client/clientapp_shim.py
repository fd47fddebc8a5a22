"""``flwr-clientapp`` on a fedlora tenant node: hands the task to the tenant worker.

Flower's SuperExec starts ``flwr-clientapp --runtime-api-address ADDR --token T ...`` for
every message, found on ``PATH``. A node started by ``fedlora deploy supernode`` puts this
stand-in first on its SuperNode's ``PATH`` (:func:`install`): a script that runs this module
in an isolated interpreter without site-packages (the standard library only, tens of
milliseconds instead of Flower's seconds of imports). It passes the address and token to the
worker (:mod:`fedlora.client.task_runner` pulls and answers the task there, with the model loaded)
and waits for it, exiting 0 when the task completed.

It execs Flower's own ``flwr-clientapp`` unchanged (same arguments) when the worker cannot
take the task -- no worker answers, or it refuses before using the token -- and when the
command line has anything it does not know (a token on stdin, runtime dependency
installation, a flag of a newer Flower). Once the worker took the task the token is spent:
a failure then is the task's failure, never a second attempt.

    flwr-clientapp FLOWER-ARGS...   # the script install() writes: python -I -S, this module's main()
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

COMMAND = "flwr-clientapp"  # the name Flower's SubprocessExecutor looks up on PATH


def parse_flower_args(args: list[str]) -> dict | None:
    """The task spec from ``flwr-clientapp``'s command line, or None where it is not one we can hand over."""
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    p.add_argument("--token")
    p.add_argument("--token-file")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates")
    p.add_argument("--parent-pid", type=int)
    try:
        ns, unknown = p.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit):
        return None
    if unknown or (ns.insecure and ns.root_certificates):
        return None
    token = ns.token
    if token is None and ns.token_file:
        try:
            token = Path(ns.token_file).expanduser().read_text(encoding="utf-8")
        except OSError:
            return None
    token = (token or "").strip()
    if not token:
        return None
    certs = None if ns.root_certificates is None else str(Path(ns.root_certificates).expanduser().resolve())
    return {"address": ns.runtime_api_address, "token": token, "insecure": bool(ns.insecure or certs is None),
            "root_certificates": certs, "parent_pid": ns.parent_pid}


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exec_flower(flower: str, args: list[str], why: str) -> None:
    print(f"fedlora {COMMAND}: {why}; running Flower's {COMMAND}", file=sys.stderr, flush=True)
    try:
        os.execv(flower, [flower, *args])
    except OSError as err:
        print(f"fedlora {COMMAND}: cannot run Flower's {COMMAND} at {flower}: {err.strerror or err}; "
              f"restart the node (`fedlora deploy supernode`) to find it again", file=sys.stderr, flush=True)
        raise SystemExit(127) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--worker-socket", required=True)
    p.add_argument("--flower", required=True, help="Flower's own flwr-clientapp, run when the worker cannot")
    args = p.parse_args(own)
    spec = parse_flower_args(flower_args)
    if spec is None:
        _exec_flower(args.flower, flower_args, "a command line the tenant worker does not take")
    from fedlora.client import worker_link

    parent = spec.pop("parent_pid")
    try:
        result = worker_link.run_task(args.worker_socket, spec, keep_waiting=lambda: _alive(parent))
    except worker_link.WorkerUnavailable as why:
        _exec_flower(args.flower, flower_args, str(why))
        return 1  # not reached
    except worker_link.WorkerFailed as why:
        print(f"fedlora {COMMAND}: {why}", file=sys.stderr, flush=True)
        return 1
    if result.get("status") != "completed":
        print(f"fedlora {COMMAND}: the {result.get('type', '?')} task {result.get('status')}: "
              f"{result.get('details', '')}", file=sys.stderr, flush=True)
        return 1
    return 0


def install(bin_dir: Path, *, worker_socket: Path, flower: str | Path) -> Path:
    """Write ``bin_dir/flwr-clientapp`` (mode 0700), which runs this module against ``worker_socket``
    and falls back to ``flower``; put ``bin_dir`` first on the SuperNode's PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    # Without site-packages the installed fedlora is not importable: the script names the package
    # `fedlora.client` after this module's folder (its __init__ is not run; the shim needs the
    # standard library and worker_link only), in a wheel and in an editable install alike.
    boot = ("import sys, types\n"
            "for name, path in (('fedlora', []), ('fedlora.client', [sys.argv.pop(1)])):\n"
            "    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = path\n"
            "from fedlora.client.clientapp_shim import main; raise SystemExit(main())")
    script = bin_dir / COMMAND
    tmp = script.with_suffix(".tmp")
    tmp.write_text("#!/bin/sh\n"
                   f"# fedlora: hands each ClientApp task to the tenant worker ({__name__})\n"
                   f"exec {shlex.quote(sys.executable)} -I -S -c {shlex.quote(boot)} "
                   f"{shlex.quote(str(Path(__file__).resolve().parent))} --worker-socket {shlex.quote(str(worker_socket))} "
                   f"--flower {shlex.quote(str(flower))} -- \"$@\"\n", encoding="utf-8")
    tmp.chmod(0o700)
    tmp.replace(script)
    return script


if __name__ == "__main__":
    raise SystemExit(main())

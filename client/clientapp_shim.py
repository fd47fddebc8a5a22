"""``flwr-clientapp`` on a fedlora tenant node: hands the task to the tenant worker.

Flower's SuperExec starts ``flwr-clientapp --runtime-api-address ADDR --token T ...`` for
every message, found on ``PATH``. A node started by ``fedlora deploy supernode`` puts this
stand-in first on its SuperNode's ``PATH`` (:func:`install`): a script that runs this module
in an isolated interpreter without site-packages (the standard library only, tens of
milliseconds instead of Flower's seconds of imports). It passes the address and token to the
worker (:mod:`fedlora.client.task_runner` pulls and answers the task there, with the model loaded)
and waits for it, exiting 0 when the task completed.

It never runs Flower's own ``flwr-clientapp``, which would install and import whatever app
bundle (FAB) the run ships: server-supplied code beside the tenant's raw data and node key.
When the worker cannot take the task -- none answers (``--no-worker``, a restart, a worker
that died too often), or it refuses before using the token -- and when the command line has
anything it does not know, it execs the node's *fallback* instead (same arguments): by
default :mod:`fedlora.client.standalone`, which runs the task in a fresh process with the
node's own installed fedlora (slower: it loads the model; never the bundle's code, unless the
bundle's hash is on the node's ``--trusted-fab`` list). Once the worker took the task the
token is spent: a failure then is the task's failure, never a second attempt.

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


def _exec_fallback(fallback: list[str], args: list[str], why: str) -> None:
    print(f"fedlora {COMMAND}: {why}; running the task in a fresh process of this node's fedlora (never the "
          "run's app bundle)", file=sys.stderr, flush=True)
    try:
        os.execv(fallback[0], [*fallback, *args])
    except OSError as err:
        print(f"fedlora {COMMAND}: cannot run {fallback[0]}: {err.strerror or err}; restart the node "
              "(`fedlora deploy supernode`)", file=sys.stderr, flush=True)
        raise SystemExit(127) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--worker-socket", help="the tenant worker's socket (none: every task runs in the fallback)")
    p.add_argument("--fallback", required=True, action="append",
                   help="the command (one word per flag) run when the worker cannot take the task")
    args = p.parse_args(own)
    spec = parse_flower_args(flower_args)
    if spec is None:
        _exec_fallback(args.fallback, flower_args, "a command line the tenant worker does not take")
    if not args.worker_socket:
        _exec_fallback(args.fallback, flower_args, "this node has no tenant worker")
    from fedlora.client import worker_link

    parent = spec.pop("parent_pid")
    try:
        result = worker_link.run_task(args.worker_socket, spec, keep_waiting=lambda: _alive(parent))
    except worker_link.WorkerUnavailable as why:
        _exec_fallback(args.fallback, flower_args, str(why))
        return 1  # not reached
    except worker_link.WorkerFailed as why:
        print(f"fedlora {COMMAND}: {why}", file=sys.stderr, flush=True)
        return 1
    if result.get("status") != "completed":
        print(f"fedlora {COMMAND}: the {result.get('type', '?')} task {result.get('status')}: "
              f"{result.get('details', '')}", file=sys.stderr, flush=True)
        return 1
    return 0


def fallback_command(trusted_fabs: tuple[str, ...] = ()) -> list[str]:
    """This node's own fresh-process task runner (:mod:`fedlora.client.standalone`)."""
    return [sys.executable, "-m", "fedlora.client.standalone", *(f"--trusted-fab={h}" for h in trusted_fabs), "--"]


def install(bin_dir: Path, *, worker_socket: Path | None, fallback: list[str] | None = None) -> Path:
    """Write ``bin_dir/flwr-clientapp`` (mode 0700), which runs this module against ``worker_socket``
    (None: no worker) and falls back to ``fallback`` (default: :func:`fallback_command`); put
    ``bin_dir`` first on the SuperNode's PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    # Without site-packages the installed fedlora is not importable: the script names the package
    # `fedlora.client` after this module's folder (its __init__ is not run; the shim needs the
    # standard library and worker_link only), in a wheel and in an editable install alike.
    boot = ("import sys, types\n"
            "for name, path in (('fedlora', []), ('fedlora.client', [sys.argv.pop(1)])):\n"
            "    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = path\n"
            "from fedlora.client.clientapp_shim import main; raise SystemExit(main())")
    own = " ".join([*([f"--worker-socket={shlex.quote(str(worker_socket))}"] if worker_socket else []),
                    *(f"--fallback={shlex.quote(word)}" for word in (fallback or fallback_command()))])
    script = bin_dir / COMMAND
    tmp = script.with_suffix(".tmp")
    tmp.write_text("#!/bin/sh\n"
                   f"# fedlora: hands each ClientApp task to the tenant worker ({__name__})\n"
                   f"exec {shlex.quote(sys.executable)} -I -S -c {shlex.quote(boot)} "
                   f"{shlex.quote(str(Path(__file__).resolve().parent))} {own} -- \"$@\"\n", encoding="utf-8")
    tmp.chmod(0o700)
    tmp.replace(script)
    return script


if __name__ == "__main__":
    raise SystemExit(main())

"""One ClientApp task in a fresh process, with this node's own fedlora: never the run's bundle code.

    python -m fedlora.client.standalone [--trusted-fab SHA256 ...] -- FLOWER-ARGS...

What a tenant node runs when its worker cannot take a task (``--no-worker``, a restart, a
worker that died too often): :mod:`fedlora.client.clientapp_shim` execs this instead of Flower's
``flwr-clientapp``. It takes the same command line, pulls the task from the SuperNode's
Runtime API and answers it with the handlers of the fedlora *installed on this node*
(:mod:`fedlora.client.task_runner`, as the worker does), behind the tenant policy. The run's
app bundle (FAB) only has to name fedlora's ClientApp; its code is never imported. A bundle
whose SHA-256 the node lists with ``--trusted-fab`` is the one exception: its own ClientApp
then runs here, through Flower's loader, as ``flwr-clientapp`` would run it.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("fedlora.standalone")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m fedlora.client.standalone", description=__doc__.split("\n\n")[0])
    p.add_argument("--trusted-fab", action="append", default=[], metavar="SHA256",
                   help="an app bundle's hash whose own ClientApp this node may run")
    args = p.parse_args(own)
    from fedlora.client.clientapp_shim import parse_flower_args

    spec = parse_flower_args(flower_args)
    if spec is None:
        print(f"fedlora flwr-clientapp: this node takes no task from the command line {flower_args!r} (a token on "
              "stdin, runtime installs, or flags of another Flower); it runs no app bundle's code. Start the node "
              "with `fedlora deploy supernode`", file=sys.stderr, flush=True)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedlora-clientapp %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from fedlora.common.offline import quiet_and_offline

    quiet_and_offline()
    from fedlora.client.client_app import packed_arrays
    from fedlora.client.handlers import app as handlers
    from fedlora.client.task_runner import TaskSpec, run_task

    spec.pop("parent_pid", None)
    result = run_task(TaskSpec.from_dict(spec), lambda m, c: packed_arrays(m, c, handlers),
                      trusted_fabs=frozenset(args.trusted_fab))
    log.info("%s task %s (%s)", result.message_type, result.status, result.phase_line())
    if result.status != "completed":
        print(f"fedlora flwr-clientapp: the {result.message_type} task {result.status}: {result.details}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

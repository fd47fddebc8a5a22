"""The tenant worker: one long-running process per deployment node that handles every
ClientApp message with the model, the data and the ledger already loaded.

    python -m fedlora.client.worker --socket STATE_DIR/worker/worker.sock [--parent-pid PID]

It handles one message at a time (health requests are answered meanwhile) on a Unix socket
(see :mod:`fedlora.client.worker_link` for the channel and its protection) with the very handlers a
ClientApp runs in-process (:mod:`fedlora.client.handlers`), so a message means the same thing with
or without a worker. A message reaches it in one of two ways: as a whole task, handed over
by fedlora's ``flwr-clientapp`` (:mod:`fedlora.client.clientapp_shim`), which the worker pulls from
the SuperNode and answers itself (:mod:`fedlora.client.task_runner`: no process per message); or
forwarded by the ClientApp of a Flower ``flwr-clientapp`` process (:mod:`fedlora.client.client_app`). What
the handlers cache per process (``fedlora.client.task.session``: the base with its adapter slot;
``fedlora.client.task.tenant_data``: the tokenized data) therefore lives across messages and runs,
and is reloaded when a run names another model, adapter or data config. As it starts, the
worker loads the model ``warm.json`` beside its socket names (:mod:`fedlora.client.warm`), in the
background, so round 1 does not wait for it. The privacy ledger
and the delta residuals stay in the node's state directory, read and written per round, so
they mean the same after a restart.

A ClientApp that dies mid-request costs nothing but that reply: the worker finishes, drops
the answer and serves the next. The worker exits when its parent (``fedlora deploy
supernode``) is gone, on SIGTERM or SIGINT, and removes its socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

from fedlora.client import worker_link as link

log = logging.getLogger("fedlora.worker")
IO_TIMEOUT = 120.0  # seconds a request or a reply may take to cross the local socket (not the handling)


class Worker:
    """A bound, listening socket and the state of what it served."""

    def __init__(self, path: Path | str, app=None):
        self.path = Path(path)
        self.app = app  # the ClientApp whose handlers run (None: fedlora.client.handlers.app, imported on first use)
        self.started = time.time()
        self.served = self.failed = self.dropped = self.stopped = 0
        self.tasks = 0  # the messages it pulled itself (handed over by fedlora's flwr-clientapp)
        self.busy: str | None = None
        self._one_at_a_time = threading.Lock()
        self.last: dict = {}
        self.warm: dict = {"state": "none"}  # the model loaded before the first task (fedlora.client.warm)
        self._remembered: dict | None = None  # what warm.json was last set to by this worker
        self.sock = self._bind()

    def _bind(self) -> socket.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():  # a stale socket of a worker that died; a live one still answers
            try:
                link.health(self.path, timeout=2.0)
            except (link.WorkerUnavailable, link.WorkerFailed):
                self.path.unlink()
            else:
                raise RuntimeError(f"another tenant worker already serves {self.path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600: only this user may connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        return sock

    # -- warm-up ------------------------------------------------------------------
    def start_warm_up(self) -> threading.Thread:
        """Load the model ``<worker dir>/warm.json`` names, in the background: health is answered
        meanwhile, and a task that arrives first waits for it rather than loading a second copy."""
        from fedlora.client.warm import WARM_FILE, warm_up

        self.warm = {"state": "warming"}

        def run():
            with self._one_at_a_time:
                self.warm = warm_up(self.path.parent / WARM_FILE)

        thread = threading.Thread(target=run, name="worker-warm-up", daemon=True)
        thread.start()
        return thread

    def _remember(self) -> None:
        """Keep the model this worker now holds as the next start's warm-up."""
        from fedlora.client.warm import loaded_flat, write_warm

        flat = loaded_flat()
        if flat is not None and flat != self._remembered:  # the file is read and written only on a change
            try:
                write_warm(self.path.parent, flat)
                self._remembered = flat
            except OSError as err:
                log.warning("could not record the loaded model for the next warm-up: %s", err)

    # -- serving ------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept connections; each is served on its own thread so that health requests are
        answered while a message is handled, but messages are handled one at a time."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by close()
                return
            threading.Thread(target=self._serve_and_close, args=(conn,), name="worker-request", daemon=True).start()

    def _serve_and_close(self, conn: socket.socket) -> None:
        with conn:
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        if not _same_user(conn):
            log.warning("refused a connection from another user")
            return
        conn.settimeout(IO_TIMEOUT)  # a peer that connects and goes quiet holds only its own thread, for a while
        try:
            version, kind, payload = link.read_frame(conn)
        except (ConnectionError, OSError, struct.error) as err:
            log.warning("dropped a malformed request: %s", err)
            return
        if version != link.VERSION:
            link.send_frame(conn, link.REFUSED, f"worker protocol {link.VERSION}".encode())
            return
        if kind == link.HEALTH:
            link.send_frame(conn, link.REPLY, json.dumps(self.health()).encode())
            return
        if kind == link.RUN_TASK:
            reply_kind, body = self._run_task(payload)
        elif kind == link.HANDLE:
            with self._one_at_a_time:
                reply_kind, body = self._handle(payload)
        else:
            link.send_frame(conn, link.FAILED, f"unknown request kind {kind}".encode())
            return
        try:
            link.send_frame(conn, reply_kind, body)
        except OSError as err:  # the ClientApp died while we worked: its reply is lost, we go on
            self.dropped += 1
            log.warning("the ClientApp left before its reply (%s); serving the next request", err)

    def _handlers(self):
        if self.app is None:
            from fedlora.client.handlers import app as handlers

            self.app = handlers
        return self.app

    def _run_task(self, payload: bytes) -> tuple[int, bytes]:
        """A ClientApp task handed over by ``flwr-clientapp``'s stand-in (see :mod:`fedlora.client.task_runner`)."""
        from fedlora.client.client_app import packed_arrays
        from fedlora.client.task_runner import TaskSpec, run_task

        try:
            spec = TaskSpec.from_dict(json.loads(payload))
        except (ValueError, TypeError, AttributeError) as err:  # refused before the token is used
            return link.REFUSED, f"not a task: {err}".encode()
        handlers = self._handlers()
        log.info("took a ClientApp task")

        def app(message, context):
            self.busy = message.metadata.message_type
            try:
                return packed_arrays(message, context, handlers)
            finally:
                self.busy = None

        start = time.perf_counter()
        result = run_task(spec, app, one_at_a_time=self._one_at_a_time)
        self._remember()
        seconds = round(time.perf_counter() - start, 3)
        ok, stopped = result.status == "completed", result.status == "stopped"
        self.served += ok
        self.stopped += stopped  # the task's run ended first: not the worker's failure
        self.failed += not (ok or stopped)
        self.tasks += 1
        self.last = {"type": result.message_type, "seconds": seconds, "error": None if ok else result.details}
        log.info("%s task %s in %.2f s (%s)", result.message_type, result.status, seconds, result.phase_line())
        return link.REPLY, json.dumps(result.as_dict()).encode()

    def _handle(self, payload: bytes) -> tuple[int, bytes]:
        from flwr.common import serde
        from flwr.proto.message_pb2 import Context as ProtoContext, Message as ProtoMessage

        self._handlers()
        start = time.perf_counter()
        what = "?"
        try:
            msg_bytes, ctx_bytes = link.unpack_parts(payload)
            message = serde.message_from_proto(ProtoMessage.FromString(msg_bytes))
            context = serde.context_from_proto(ProtoContext.FromString(ctx_bytes))
            what = message.metadata.message_type
            self.busy = what
            reply = self.app(message, context)
            self._remember()
            body = link.pack_parts(serde.message_to_proto(reply).SerializeToString(),
                                   serde.recorddict_to_proto(context.state).SerializeToString())
            self.served += 1
            self.last = {"type": what, "seconds": round(time.perf_counter() - start, 3),
                         "error": reply.error.reason if reply.has_error() else None}
            log.info("%s message handled in %.2f s", what, self.last["seconds"])
            return link.REPLY, body
        except Exception as err:  # noqa: BLE001 - any handler error goes back to the ClientApp, as Flower would report it
            self.failed += 1
            self.last = {"type": what, "seconds": round(time.perf_counter() - start, 3),
                         "error": f"{type(err).__name__}: {err}"}
            log.error("a %s message failed: %s", what, err)
            return link.FAILED, f"{type(err).__name__}: {err}\n{traceback.format_exc()}".encode()
        finally:
            self.busy = None

    def health(self) -> dict:
        task = sys.modules.get("fedlora.client.task")  # what the handlers hold loaded, once they ran
        models = [{"base": k[0].base, "precision": k[0].precision, "adapter": k[1].method, "r": k[1].r}
                  for k in (task._MODELS if task else ())]
        return {"pid": os.getpid(), "socket": str(self.path), "uptime_s": round(time.time() - self.started, 1),
                "served": self.served, "failed": self.failed, "dropped_replies": self.dropped, "tasks": self.tasks,
                "stopped_tasks": self.stopped, "busy": self.busy, "warm": self.warm,
                "last": self.last, "models": models, "tenants_cached": len(task._DATA) if task else 0,
                "rss_mb": round(_rss_bytes() / 2**20, 1), "protocol": link.VERSION}

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        except OSError:
            pass
        try:
            self.sock.close()
        finally:
            if self.path.exists():
                self.path.unlink()


def _same_user(conn: socket.socket) -> bool:
    """The peer runs as this process's user (Linux SO_PEERCRED; elsewhere the 0600 file mode)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _watch_parent(parent: int, stop) -> None:
    """Exit when the parent is gone (it was SIGKILLed: no one else would stop us)."""
    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                log.warning("the SuperNode's supervisor (pid %d) is gone; exiting", parent)
                stop()
                os._exit(0)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedlora.client.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="the Unix socket to serve on (created mode 0600)")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument("--no-preload", action="store_true",
                   help="import the ML stack at the first message, not now, and load no warm-up model "
                        "(warm.json beside the socket)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedlora-worker %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request otherwise
    from fedlora.common.offline import quiet_and_offline

    quiet_and_offline()
    if not args.no_preload:
        from fedlora.client.warm import import_training_path

        import_training_path()  # torch, transformers, peft: once, before the socket exists
    worker = Worker(args.socket)
    if not args.no_preload:
        worker.start_warm_up()

    def stop(*_):
        worker.close()

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    signal.signal(signal.SIGINT, lambda *_: (stop(), sys.exit(0)))
    if args.parent_pid:
        _watch_parent(args.parent_pid, stop)
    log.info("serving on %s (pid %d)", worker.path, os.getpid())
    try:
        worker.serve_forever()
    finally:
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`fedlora deploy superlink`'s supervisor: the SuperLink first, then its executor and proxy; one
exits, all stop, with its code."""

from __future__ import annotations

import sys

from fedlora.simulations.cli.launcher import free_port
from fedlora.simulations.cli.superlink_node import SuperLinkHost


def test_a_child_that_exits_stops_the_others_with_its_code(tmp_path):
    # Prepare: a "SuperLink" that listens, an executor that would run for long, a proxy that fails
    port = free_port()
    link = [sys.executable, "-c", f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); "
                                  "s.listen(); time.sleep(60)"]
    host = SuperLinkHost(link, [sys.executable, "-c", "import time; time.sleep(60)"],
                         [sys.executable, "-c", "raise SystemExit(3)"], internal_port=port)
    # Execute
    code = host.run()
    # Assert: the proxy's code, and nothing left running
    assert code == 3
    assert all(child.poll() is not None for child in host.children.values())
    assert set(host.children) == {"superlink", "serverapp executor", "fleet proxy"}


def test_a_superlink_that_never_listens_starts_nothing_else(tmp_path, monkeypatch):
    from fedlora.simulations.cli import superlink_node

    monkeypatch.setattr(superlink_node, "READY_TIMEOUT", 1.0)
    host = SuperLinkHost([sys.executable, "-c", "import time; time.sleep(60)"], ["false"], ["false"],
                         internal_port=free_port())
    assert host.run() == 1 and set(host.children) == {"superlink"}
    assert host.children["superlink"].poll() is not None

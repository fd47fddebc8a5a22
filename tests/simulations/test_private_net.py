"""A simulation's private network: what listens on its loopback is unreachable from the machine's."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from fedlora.simulations.cli import private_net
from fedlora.simulations.cli.launcher import free_port

SERVE = """
import socket, sys
from fedlora.simulations.cli.private_net import loopback_up
loopback_up()
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)  # reachable from inside
print("inside ok", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def private_server():
    if private_net.unavailable() is not None:
        pytest.skip(private_net.unavailable())
    port = free_port()
    proc = subprocess.Popen(["unshare", *private_net.UNSHARE, "--", sys.executable, "-c", SERVE, str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        assert proc.stdout.readline().strip() == "inside ok"
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_a_port_on_the_private_loopback_is_closed_to_the_machine(private_server):
    # Execute: connect from the machine's own loopback to the port the private process listens on
    time.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", private_server), timeout=2).close()

"""`photoenhance serve` refuses a port another server listens on, before starting Ray.

Ray's proxy listens with SO_REUSEPORT, so without the check a second server on the same port
starts and the kernel splits the first one's connections between the two.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from serve_app.cli.serve import port_taken

ROOT = Path(__file__).resolve().parents[1]


def listener(reuse_port: bool) -> socket.socket:
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as Ray's proxy does
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_port_taken_tells_a_busy_port_from_a_free_one() -> None:
    for reuse_port in (False, True):
        with listener(reuse_port) as busy:
            port = busy.getsockname()[1]
            assert port_taken("127.0.0.1", port) is not None
            assert port_taken("0.0.0.0", port) is not None  # the wildcard overlaps it
        # Closed (its port may sit in TIME_WAIT): free again.
        assert port_taken("127.0.0.1", port) is None


def test_serve_on_a_busy_port_exits_1_before_starting_ray() -> None:
    with listener(reuse_port=True) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "photoenhance"), "serve", "--config", "configs/dev.yaml",
             "--port", str(port), "--no-dashboard"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port} is already in use" in done.stderr
    assert "choose another --port" in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout  # refused first

"""`blip serve` as a child process for the tests: on loopback, in its own process group, always terminated."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerUrl(str):
    """The server's URL; ``pid``: its process id."""
    pid: int


@contextmanager
def serve_process(args: list[str], env: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                  startup_s: float = 180) -> Iterator[ServerUrl]:
    """Run ``blip serve ARGS --host 127.0.0.1 --port <free port>``; yield its URL (with the ``pid``) once ``/health``
    answers 200 (sent with ``headers``), then terminate it (SIGKILL if SIGTERM is not enough)."""
    port = free_port()
    cmd = [sys.executable, "-m", "blip.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryFile() as log:   # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        url = ServerUrl(f"http://127.0.0.1:{port}")
        url.pid = proc.pid

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        try:
            deadline = time.monotonic() + startup_s
            while True:
                assert proc.poll() is None, f"server exited: {output()}"
                assert time.monotonic() < deadline, f"server not up within {startup_s} s: {output()}"
                try:
                    if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)

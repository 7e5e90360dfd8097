"""A real local Ray cluster for the tests: ``ray start --head`` in a private temp dir, stopped
(processes and all) when the tests are done."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_cluster(tmp: Path, cpus: int = 2) -> Iterator[str]:
    """Start a head node with ``cpus`` CPUs; yields its address.

    Ray ≥ 2.59 starts local clusters with token authentication (the token in ~/.ray/auth_token),
    but a driver joining by address only sends the token when ``RAY_AUTH_MODE=token`` is in its
    environment *before ray is imported* (measured with Ray 2.60: "InvalidAuthToken" otherwise), as
    an operator sets it in relexd's environment; :data:`AUTH` is that setting."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    # Ray's socket paths must stay short (AF_UNIX: 107 bytes): a short temp dir of its own
    temp = Path(f"/tmp/relexd-ray-{os.getpid()}")
    port = _free_port()
    env = os.environ | AUTH | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    start = [
        ray, "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0",
        "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)

"""A real local Ray cluster for the tests: ``ray start --head`` in a private temp dir, stopped
(processes and all) when the tests are done."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"RAY_AUTH_MODE": "token"}


# Ports `ray start` reserves for its other components unless told otherwise (ray_constants:
# dashboard 8265, dashboard agent 52365, client server 10001, workers 10002-19999). An ephemeral
# port the kernel hands out may be one of them (52365 was, in a CI run: "port number 52365 that is
# used by other components"), so the head's port is drawn until it is none of them.
RAY_RESERVED = {8265, 52365, *range(10001, 20000)}


def _free_port(avoid: set[int] = RAY_RESERVED) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


@contextmanager
def local_cluster(tmp: Path, cpus: int = 2) -> Iterator[str]:
    """Start a head node with ``cpus`` CPUs; yields its address.

    ``ray start --head --block`` in its own session: SIGTERM to it drains and stops exactly this
    cluster's processes (``ray stop`` would stop every Ray cluster of the machine, a developer's
    own included); its process group is killed if it does not stop within a minute.

    Ray ≥ 2.59 starts local clusters with token authentication (the token in ~/.ray/auth_token),
    but a driver joining by address only sends the token when ``RAY_AUTH_MODE=token`` is in its
    environment *before ray is imported* (measured with Ray 2.60: "InvalidAuthToken" otherwise), as
    an operator sets it in relexd's environment; :data:`AUTH` is that setting."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    # Ray's socket paths must stay short (AF_UNIX: 107 bytes): a short temp dir of its own
    temp = Path(f"/tmp/relexd-ray-{os.getpid()}")
    port = _free_port()
    # `ray start` with token auth refuses to run without a token file (~/.ray/auth_token on a
    # machine that ran Ray before; a fresh one has none): give the cluster and this process its own
    if "RAY_AUTH_TOKEN_PATH" not in os.environ and not (Path.home() / ".ray" / "auth_token").exists():
        token = tmp / "ray-auth-token"
        token.write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    env = os.environ | AUTH | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    start = [
        ray, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0",
        "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(tmp / "ray-start.log", "w+")  # noqa: SIM115 — closed below
    head = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (tmp / "ray-start.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{(tmp / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)

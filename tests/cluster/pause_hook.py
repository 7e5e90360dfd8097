"""Runs in every Ray worker process of the kill tests (Ray's ``worker_process_setup_hook``): the
first worker to reach the point named by ``RELEXD_TEST_PAUSE`` ("reading", "writing" or
"written", then ":" and a directory), once the test has created ``armed`` there, writes its pid
there and stops, so the test can SIGKILL it at
exactly that point. Nothing of this is in relexd itself.

A process that calls ``ray.init`` itself (``relexd watch --ray``) gives its workers this hook through
Ray's ``RAY_RUNTIME_ENV_HOOK`` variable naming :func:`runtime_env`."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _claim_and_stop(where: Path) -> None:
    if not (where / "armed").exists():
        return  # the test arms the point when it wants it
    try:
        fd = os.open(where / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another worker (or this one, before a restart) already stopped here
    os.close(fd)
    (where / "pid.tmp").write_text(str(os.getpid()))
    os.replace(where / "pid.tmp", where / "pid")
    time.sleep(600)


def _after(fn: Callable[..., Any], where: Path) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kw: Any) -> Any:
        result = fn(*args, **kw)
        _claim_and_stop(where)
        return result

    return wrapped


def _before(fn: Callable[..., Any], where: Path) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kw: Any) -> Any:
        _claim_and_stop(where)
        return fn(*args, **kw)

    return wrapped


def install() -> None:
    spec = os.environ.get("RELEXD_TEST_PAUSE")
    if not spec:
        return
    point, directory = spec.split(":", 1)
    where = Path(directory)
    from relexd.engine import ingest
    from relexd.io import safetensors_file
    from relexd.state import store

    if point == "reading":  # inside the first tensor's read of the checkpoint (both read paths)
        ingest.read_delta_range = _before(ingest.read_delta_range, where)
    elif point == "writing":  # after the first rows of the part file are written
        cls = safetensors_file.PositionalSafetensorsWriter
        cls.write = _after(cls.write, where)
    elif point == "written":  # the part is complete and fsync'd; its result not yet sent
        store.PartWriters.close = _after(store.PartWriters.close, where)
    else:
        raise ValueError(f"RELEXD_TEST_PAUSE: unknown point {point!r}")


def runtime_env(env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's runtime-environment hook: the workers get ``RELEXD_TEST_PAUSE`` and :func:`install`."""
    out = dict(env or {})
    out["env_vars"] = {
        **out.get("env_vars", {}),
        "RELEXD_TEST_PAUSE": os.environ["RELEXD_TEST_PAUSE"],
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    out["worker_process_setup_hook"] = "tests.cluster.pause_hook.install"
    return out

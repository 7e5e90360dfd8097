"""A real systemd booted in a ``systemd-nspawn`` container, driven from outside with ``nsenter``.

The recipe (measured on Debian 12, as root; ../shared/NSPAWN.md): ``debootstrap --variant=minbase``
of bookworm with systemd, dbus and python3 (about a minute and a half), then ``systemd-nspawn
--register=no --keep-unit -b`` — the two flags because the host runs no systemd to register with —
boots systemd 252 to ``running``; ``nsenter -t <its PID 1> -a`` runs commands in all of its
namespaces. Nothing here is relexd-specific.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv"
#: A clean environment for commands in the container (the test's own PATH names host paths).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


def bootstrap(rootfs: Path, log: Path) -> None:
    """A minimal Debian bookworm with systemd and python3 at ``rootfs`` (downloads from Debian)."""
    with log.open("w") as out:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(rootfs)],
            stdout=out, stderr=subprocess.STDOUT, check=True, timeout=900,
        )  # fmt: skip


def pip_setup(rootfs: Path) -> tuple[dict[str, str], list[Path]]:
    """Carry the host's pip configuration into the container: its config files are copied, its
    ``PIP_*`` variables returned as environment, and the local directories they name (wheel
    directories, file:// indexes, constraint files) returned for read-only binding — so pip in the
    container installs exactly what the host's pip would, from the same sources."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    files = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), Path.home() / ".config/pip/pip.conf"]
    values = list(env.values())
    for file in files:
        if not file.is_file():
            continue
        target = rootfs / str(file).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        parser = configparser.ConfigParser()
        parser.read(file)
        values += [v for section in parser.sections() for v in parser[section].values()]
    local: set[Path] = set()
    for value in values:
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.name == "simple":  # a PEP 503 index root: its pages link to files beside it
                path = path.parent
            if path.is_absolute() and path.exists() and not str(path).startswith("/etc/ssl"):
                local.add(path)
    certs = Path("/etc/ssl/certs/ca-certificates.crt")
    if certs.is_file():
        (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(certs, rootfs / "etc/ssl/certs/ca-certificates.crt")
    return env, sorted(local)


class Container:
    """One booted container; :meth:`sh` runs a bash script inside it as root."""

    def __init__(self, rootfs: Path, *, binds: dict[Path, str], ro_binds: dict[Path, str], log: Path) -> None:
        self.rootfs = rootfs
        self.binds, self.ro_binds = binds, ro_binds
        self.log = log
        self.env = dict(BASE_ENV)
        self.process: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None

    def boot(self, timeout: float = 120.0) -> None:
        args = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--console=passive"]
        args += ["-D", str(self.rootfs)]
        args += [f"--bind={src}:{dst}" for src, dst in self.binds.items()]
        args += [f"--bind-ro={src}:{dst}" for src, dst in self.ro_binds.items()]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([*args, "-b"], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"systemd-nspawn exited: {self.log.read_text()[-2000:]}"
            self.pid1 = self.pid1 or self._find_pid1()
            if self.pid1 is not None:
                state = self.sh("systemctl is-system-running || true", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        raise AssertionError(f"container did not boot (state {state!r}): {self.log.read_text()[-2000:]}")

    def _find_pid1(self) -> int | None:
        """The container's init: the child of systemd-nspawn."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = [int(p) for p in children.read_text().split()]
        except OSError:
            return None
        return pids[0] if pids else None

    def _enter(self, *command: str) -> list[str]:
        """``command`` run in every namespace of the container (as its root)."""
        assert self.pid1 is not None, "not booted"
        return ["nsenter", "-t", str(self.pid1), "-a", *command]

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``bash -euo pipefail -c script`` in every namespace of the container, as its root."""
        result = subprocess.run(
            self._enter("bash", "-euo", "pipefail", "-c", script),
            capture_output=True, text=True, timeout=timeout, env=self.env | (env or {}),
        )  # fmt: skip
        if check and result.returncode != 0:
            output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            raise AssertionError(f"in the container, exit {result.returncode}:\n$ {script}\n{output}")
        return result

    def background(self, script: str) -> subprocess.Popen[str]:
        """Start ``script`` in the container without waiting for it."""
        return subprocess.Popen(
            self._enter("bash", "-euo", "pipefail", "-c", script),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
        )  # fmt: skip

    def poweroff(self, timeout: float = 60.0) -> None:
        """Shut the container down cleanly; kill it if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        if self.pid1 is not None:
            subprocess.run(self._enter("systemctl", "poweroff"), capture_output=True, timeout=30)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

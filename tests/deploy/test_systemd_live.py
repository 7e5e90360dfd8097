"""relexd@.service under a real systemd (252, Debian bookworm booted in systemd-nspawn), installed
with the README's own commands, beside a writer filling the run directory (issue 14).

The tests run in file order against one container and one service instance: start (READY after
the first scan), ingest and /metrics, kill -9, a hung worker, the hardening, stop, the journal.
The container and its root file system are removed afterwards, on failure too. The service's
journal is kept in the test's log directory for a post-mortem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.daemon.trainer_sim import hf_save, make_base
from tests.deploy._tools import ROOT, require_tool
from tests.deploy.nspawn import Container, bootstrap, pip_setup
from tests.engine.planted import Planted

pytestmark = pytest.mark.slow

UNIT = "relexd@exp42"
RUN, BASE, STATE = "/runs/exp42", "/models/base", "/var/lib/relexd/exp42"
#: Test-only drop-in: a short watchdog so a hang is a restart within seconds, not minutes, and a
#: stop timeout a quarter of the shipped 2 min, so "stopped by itself" means "well inside it". Every
#: other directive is the shipped unit's.
DROP_IN = "[Service]\nWatchdogSec=6s\nRestartSec=1s\nTimeoutStopSec=30s\n"
# Holds one thread of a process stopped (PTRACE_SEIZE + PTRACE_INTERRUPT) while its other threads
# run, until the process is gone or /root/thaw exists: a thread hung as if in a read of a dead file
# server. Only root (CAP_SYS_PTRACE) can do this to the service; it needs no hook in relexd.
FREEZE = textwrap.dedent(
    """
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    pid, tid = int(sys.argv[1]), int(sys.argv[2])
    for request in (0x4206, 0x4207):  # PTRACE_SEIZE, PTRACE_INTERRUPT
        if libc.ptrace(request, tid, None, None) != 0:
            sys.exit(f"ptrace({request:#x}, {tid}): {os.strerror(ctypes.get_errno())}")
    print("frozen", flush=True)
    while os.path.exists(f"/proc/{pid}/task/{tid}") and not os.path.exists("/root/thaw"):
        time.sleep(0.2)
    """
)
# Run as the service's user inside the service's own mount namespace: what the sandbox lets it do.
PROBE = textwrap.dedent(
    """
    import errno, json, os, sys
    out = {}
    for d in sys.argv[1:]:
        try:
            with open(os.path.join(d, ".relexd-probe"), "w") as f:
                f.write("x")
            os.unlink(os.path.join(d, ".relexd-probe"))
            out[d] = "ok"
        except OSError as exc:
            out[d] = errno.errorcode[exc.errno]
    try:
        open("/home/alice/secret").read()
        out["read /home/alice/secret"] = "ok"
    except OSError as exc:
        out["read /home/alice/secret"] = errno.errorcode[exc.errno]
    with open("/tmp/relexd-private-probe", "w") as f:
        f.write("x")
    print(json.dumps(out))
    """
)


def _block(marker: str) -> str:
    """The fenced bash block right after ``<!-- marker`` in the README: the commands it shows."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {re.escape(marker)}[^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert found, f"README.md has no ```bash block after <!-- {marker} -->"
    return found.group(1)


def _free_port() -> int:
    with socket.socket() as s:  # the container shares the host's network
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    box: Container
    run: Path  # host side of RUN
    planted: Planted
    port: int
    logs: Path

    def sh(self, script: str, **kw: object) -> str:
        return self.box.sh(script, **kw).stdout  # type: ignore[arg-type]

    def show(self, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} {UNIT}").strip()

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def metrics(self) -> dict[str, float]:
        """/metrics, fetched from inside the container."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        get = f"import urllib.request; print(urllib.request.urlopen('{url}').read().decode())"
        text = self.sh(f'python3 -c "{get}"')
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def journal(self) -> list[dict]:
        """The service's own log lines (journal fields + the parsed JSON message)."""
        raw = self.sh(f"journalctl -u {UNIT} -o json --no-pager _SYSTEMD_UNIT={UNIT}.service")
        entries = []
        for line in raw.splitlines():
            entry = json.loads(line)
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # journald sends non-UTF-8 messages as byte lists
                message = bytes(message).decode(errors="replace")
            entry["MESSAGE"] = message
            try:
                entry["log"] = json.loads(message)
            except (TypeError, ValueError):
                entry["log"] = None
            entries.append(entry)
        return entries

    def events(self, event: str, pid: int | None = None) -> list[dict]:
        return [
            e["log"]
            for e in self.journal()
            if e["log"] and e["log"].get("event") == event and (pid is None or int(e["_PID"]) == pid)
        ]

    def steps(self) -> list[int]:
        status = self.sh(f"/usr/local/bin/relexd status --state-dir {STATE} --json")
        return json.loads(status)["steps"]

    def save(self, step: int) -> None:
        """A checkpoint as a trainer whose files other users may read saves it (torch.save and DCP
        writers; not safetensors >= 0.8, which saves 0600 — README: run relexd as the trainer's
        user then). Written beside the run and renamed in, so it appears with its final modes."""
        staging = self.run.with_name("staging")
        ckpt = hf_save(staging, step, self.planted.at(step))
        for path in ckpt.iterdir():
            path.chmod(0o644)
        ckpt.rename(self.run / ckpt.name)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                tail = self.sh(f"journalctl -u {UNIT} -o cat --no-pager -n 40", check=False)
                raise AssertionError(f"timed out waiting for {what}; journal:\n{tail}")
            time.sleep(0.25)


def _set_env(box: Container, values: dict[str, str]) -> None:
    """Edit the installed env file as an operator would: change the keys, keep the rest."""
    path = box.rootfs / "etc/relexd/exp42.env"
    lines = [ln for ln in path.read_text().splitlines() if ln.split("=", 1)[0].lstrip("#") not in values]
    path.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in values.items())]) + "\n")


def _copy_checkout(dest: Path) -> None:
    """The checkout as git sees it (tracked and untracked-but-not-ignored files): what a clone has."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest) -> Iterator[Live]:
    if os.geteuid() != 0:
        pytest.skip("booting systemd in a container needs root")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        require_tool(tool, "apt-get install debootstrap systemd-container (scripts/install-test-tools.sh)")
    top = Path(tempfile.mkdtemp(prefix="relexd-nspawn-", dir="/var/tmp"))
    logs = Path(request.config.rootpath) / ".pytest-logs" / "systemd-live"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    box: Container | None = None
    try:
        rootfs = top / "rootfs"
        bootstrap(rootfs, logs / "debootstrap.log")
        pip_env, pip_dirs = pip_setup(rootfs)
        _copy_checkout(rootfs / "root/relexd")
        run, models = top / "run", top / "models"
        planted, base = make_base(models)
        run.mkdir()
        for path in (run, models, *models.rglob("*")):  # readable by the relexd user, as README says
            path.chmod(0o755 if path.is_dir() else 0o644)
        box = Container(
            rootfs,
            binds={run: RUN},
            ro_binds={base: BASE} | {d: str(d) for d in pip_dirs},
            log=logs / "nspawn.log",
        )
        box.boot()
        box.sh(f"cd /root/relexd\n{_block('systemd-install')}", timeout=1200, env=pip_env)
        port = _free_port()
        _set_env(
            box,
            {
                "RELEXD_RUN_DIR": RUN,
                "RELEXD_BASE": BASE,
                "RELEXD_LISTEN": f"127.0.0.1:{port}",
                "RELEXD_PREVIEW_AHEAD": "2",
                "RELEXD_DEBOUNCE": "0.5",
            },
        )
        drop_in = rootfs / f"etc/systemd/system/{UNIT}.service.d/test.conf"
        drop_in.parent.mkdir(parents=True)
        drop_in.write_text(DROP_IN)
        yield Live(box, run, planted, port, logs)
    finally:
        if box is not None:
            if box.pid1 is not None:
                journal = box.sh(f"journalctl -u {UNIT} -o short-precise --no-pager", check=False)
                (logs / "journal.txt").write_text(journal.stdout + journal.stderr)
            box.poweroff()
        shutil.rmtree(top, ignore_errors=True)


def test_ready_comes_only_after_the_first_scan(live: Live) -> None:
    for step in (10, 20):
        live.save(step)
    start = live.box.background(_block("systemd-start"))
    states = []
    while start.poll() is None:
        states.append(live.sh(f"systemctl is-active {UNIT} || true").strip())
        time.sleep(0.05)
    assert start.returncode == 0, start.stdout.read() if start.stdout else ""
    assert "activating" in states and live.sh(f"systemctl is-active {UNIT}").strip() == "active", states
    scanned = live.events("first scan done", live.main_pid())
    assert len(scanned) == 1, scanned
    # e.g. "Tue 2026-12-01 18:08:54.123456 UTC": when systemd got READY=1
    active_since = datetime.strptime(
        live.show("ActiveEnterTimestamp --timestamp=us+utc"), "%a %Y-%m-%d %H:%M:%S.%f %Z"
    )
    assert datetime.fromisoformat(scanned[0]["timestamp"]) <= active_since.replace(tzinfo=UTC)


def test_checkpoints_are_ingested_and_metrics_served_inside_the_container(live: Live) -> None:
    live.wait(lambda: live.steps() == [10, 20], "the two checkpoints present at start")
    live.save(30)  # while running: found through inotify on the bind mount
    live.wait(lambda: live.steps() == [10, 20, 30], "step 30")
    live.wait(lambda: live.metrics().get("relexd_last_checkpoint_step") == 30.0, "/metrics at step 30")
    samples = live.metrics()
    assert samples["relexd_checkpoints_ingested_total"] == 3.0
    assert samples["relexd_ingest_lag_seconds"] >= 0.0
    follow = live.box.sh(_block("systemd-follow")).stdout
    assert "step" in follow and str(RUN) in follow
    assert live.show("NRestarts") == "0"  # a 6 s watchdog, and no restart while working


def test_kill_9_is_restarted_and_resumes_from_its_state(live: Live) -> None:
    old = live.main_pid()
    live.sh(f"kill -9 {old}")
    live.wait(lambda: live.main_pid() not in (0, old) and live.show("ActiveState") == "active", "restart")
    assert live.show("NRestarts") == "1"
    new = live.main_pid()
    live.save(40)
    live.wait(lambda: live.steps() == [10, 20, 30, 40], "step 40 after the restart")
    again = [e["step"] for e in live.events("checkpoint ingested", new)]
    assert again == [40], f"the restarted daemon re-ingested {again}: it did not resume from its state"


def test_a_hung_worker_thread_is_restarted_by_the_watchdog(live: Live) -> None:
    pid = live.main_pid()
    (threads,) = live.events("threads started", pid)
    worker = threads["threads"]["relexd-worker"]
    restarts = int(live.show("NRestarts"))
    (live.box.rootfs / "root/freeze.py").write_text(FREEZE)
    freezer = live.box.background(f"exec python3 /root/freeze.py {pid} {worker}")
    manager = ""

    def watchdog_fired() -> bool:
        nonlocal manager
        manager = live.sh(f"journalctl -u {UNIT} -o cat --no-pager _PID=1")
        return "Watchdog timeout" in manager

    try:
        assert freezer.stdout is not None and freezer.stdout.readline().strip() == "frozen"
        frozen_at = time.monotonic()
        live.wait(watchdog_fired, "systemd's watchdog timeout", timeout=60)
        took = time.monotonic() - frozen_at
    finally:
        # The stuck "read" ends. Needed because of how the test hangs the thread: a thread held in
        # a ptrace stop keeps even the SIGABRT core dump waiting (measured: the process outlived
        # the abort by over a minute); a thread hung in a read or on a lock does not. (Killing
        # nsenter would not do: it forked the tracer into the container's PID namespace.)
        (live.box.rootfs / "root/thaw").touch()
        freezer.wait(30)
    assert "Killing process" in manager and "SIGABRT" in manager, manager[-2000:]
    # for the record (stall limit 6 s + up to one ping period + the 6 s timeout; measured ~12 s)
    print(f"watchdog fired {took:.1f} s after the worker hung (WatchdogSec=6s)")
    live.wait(lambda: live.main_pid() not in (0, pid), "the watchdog restart", timeout=60)
    assert int(live.show("NRestarts")) == restarts + 1
    said = live.events("thread made no progress; withholding watchdog pings so systemd restarts relexd", pid)
    assert [e["thread"] for e in said] == ["relexd-worker"], said
    live.wait(lambda: live.show("ActiveState") == "active", "active again")
    live.save(50)
    live.wait(lambda: live.steps()[-1] == 50, "step 50 after the watchdog restart")


def test_hardening_holds_in_practice(live: Live) -> None:
    live.run.chmod(0o777)  # only the sandbox stands between the service and the run now
    live.sh(
        "mkdir -p /home/alice /srv/shared /var/lib/other\n"
        "chmod 0777 /home/alice /srv/shared /var/lib/other\n"
        "echo secret > /home/alice/secret\n"
        "chown 4242:4242 /home/alice/secret && chmod 0600 /home/alice/secret\n"
        "rm -f /tmp/relexd-private-probe"
    )
    (live.box.rootfs / "root/probe.py").write_text(PROBE)
    uid, gid = live.sh("id -u relexd").strip(), live.sh("id -g relexd").strip()
    dirs = [RUN, "/home/alice", "/srv/shared", "/var/lib/other", "/opt/relexd", STATE]
    # the service's own mount namespace, as its own user
    pid = live.main_pid()
    out = live.sh(
        f"cp /root/probe.py {STATE}/.probe.py && chown {uid}:{gid} {STATE}/.probe.py\n"
        f"nsenter -t {pid} -m -S {uid} -G {gid} -- /usr/bin/python3 {STATE}/.probe.py {' '.join(dirs)}; "
        f"rm -f {STATE}/.probe.py"
    )
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {
        RUN: "EROFS",
        "/home/alice": "EROFS",
        "/srv/shared": "EROFS",
        "/var/lib/other": "EROFS",
        "/opt/relexd": "EROFS",
        STATE: "ok",
        "read /home/alice/secret": "EACCES",
    }
    # its /tmp is its own (PrivateTmp=): what it wrote there is not in the host's /tmp
    assert live.sh("ls /tmp/relexd-private-probe 2>&1 || true").strip().endswith("No such file or directory")
    live.run.chmod(0o755)


def test_stop_is_quick_and_publishes_nothing_half_written(live: Live) -> None:
    for step in (60, 70, 80, 90):
        live.save(step)
    time.sleep(0.5)  # let it be in the middle of the burst
    started = time.monotonic()
    live.sh(f"systemctl stop {UNIT}")
    print(f"systemctl stop took {time.monotonic() - started:.1f} s")
    # exited by itself, cleanly, before the drop-in's 30 s stop timeout (else Result=timeout)
    assert live.show("Result") == "success" and live.show("ExecMainStatus") == "0"
    check = textwrap.dedent(
        f"""
        import json, pathlib
        from safetensors import safe_open
        found = {{}}
        for p in sorted(pathlib.Path("{STATE}/previews").iterdir()):
            assert p.name.startswith("step-") and p.is_dir(), f"half-written entry {{p}}"
            manifest = json.loads((p / "relexd-preview.json").read_text())
            for f in p.glob("*.safetensors"):
                with safe_open(str(f), "pt") as st:
                    for k in st.keys():
                        st.get_tensor(k)
            found[p.name] = manifest["target_step"]
        print(json.dumps(found))
        """
    )
    (live.box.rootfs / "root/check_previews.py").write_text(check)
    previews = json.loads(live.sh("/opt/relexd/bin/python /root/check_previews.py").strip())
    assert previews, "no preview was published at all"
    steps = live.steps()
    assert steps[:5] == [10, 20, 30, 40, 50] and steps == sorted(steps)


def test_journal_holds_json_lines_with_step_and_path(live: Live) -> None:
    assert live.sh(f"journalctl -u {UNIT} -o cat --no-pager")  # the README's command answers
    entries = live.journal()
    dumping: set[str] = set()  # processes printing faulthandler's stacks (the watchdog's SIGABRT)
    lines = []
    for entry in entries:
        if entry["MESSAGE"].startswith("Fatal Python error: Aborted"):
            dumping.add(entry["_PID"])
        if entry["log"] is not None:
            lines.append(entry["log"])
        else:
            assert entry["_PID"] in dumping, f"a non-JSON line from the service: {entry['MESSAGE']!r}"
    assert len(dumping) == 1, "expected one stack dump: the hung worker's watchdog abort"
    stacks = "\n".join(e["MESSAGE"] for e in entries if e["_PID"] in dumping and e["log"] is None)
    assert "_worker_loop" in stacks, stacks  # where the worker was when it hung
    ingested = [e for e in lines if e.get("event") == "checkpoint ingested"]
    assert ingested and all({"step", "path"} <= set(e) for e in ingested)
    assert all(e["path"].startswith(RUN) for e in ingested)

"""A writer that saves checkpoints the way real trainers do, for the daemon's end-to-end tests.

* HF Trainer/TRL: ``checkpoint-N/`` with shards appearing one by one (each written to a temp
  name and renamed, like safetensors ≥ 0.8), then the index, config, and ``trainer_state.json``
  last; older checkpoints deleted as with ``save_total_limit``.
* verl: ``global_step_N/actor/huggingface/`` then ``latest_checkpointed_iteration.txt`` advanced
  with a plain (non-atomic) write.
* plain files: ``…step_N.safetensors`` via a temp name and rename (no marker).

Run as a script (``python trainer_sim.py RUN_DIR --layout hf --steps 10,20 …``) so it is a real
separate writer process, or call the functions directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.engine.planted import Planted


def _save_renamed(tensors: dict[str, torch.Tensor], final: Path) -> None:
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.rename(tmp, final)


def hf_save(
    run_dir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    pause: float = 0.0,
    save_steps: int | None = None,
) -> Path:
    """Save like transformers' Trainer: weights (shard by shard), config, trainer_state.json last
    (with the Trainer's ``save_steps`` when given, which reveals the steps it saved)."""
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards <= 1:
        _save_renamed(tensors, ckpt / "model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            _save_renamed({n: tensors[n] for n in part}, ckpt / fname)
            weight_map.update(dict.fromkeys(part, fname))
            time.sleep(pause)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "planted"}))
    time.sleep(pause)
    (ckpt / "optimizer.pt").write_bytes(b"\0" * 1024)  # trainer internals relexd must ignore
    record = {"global_step": step} | ({"save_steps": save_steps} if save_steps else {})
    (ckpt / "trainer_state.json").write_text(json.dumps(record))
    return ckpt


def verl_save(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], *, pause: float = 0.0) -> Path:
    """Save like verl with ``hf_model`` in save_contents, then advance the tracker file."""
    ckpt = run_dir / f"global_step_{step}"
    hf = ckpt / "actor" / "huggingface"
    hf.mkdir(parents=True, exist_ok=True)
    (ckpt / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"\0" * 512)
    _save_renamed(tensors, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps({"model_type": "planted"}))
    time.sleep(pause)
    tracker = run_dir / "latest_checkpointed_iteration.txt"
    with open(tracker, "w") as fh:  # plain write: a reader may briefly see it empty
        fh.write(str(step))
    return ckpt


def file_save(run_dir: Path, step: int, tensors: dict[str, torch.Tensor]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"model_step_{step}.safetensors"
    _save_renamed(tensors, final)
    return final


def rotate(run_dir: Path, keep: int, prefix: str = "checkpoint-") -> None:
    """Delete all but the ``keep`` newest checkpoints (save_total_limit)."""
    found = sorted(
        (int(p.name[len(prefix) :]), p) for p in run_dir.glob(prefix + "*") if p.name[len(prefix) :].isdigit()
    )
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--layout", choices=("hf", "verl", "file"), default="hf")
    ap.add_argument("--steps", required=True, help="comma-separated steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--pause", type=float, default=0.0, help="pause between files of one save")
    ap.add_argument("--interval", type=float, default=0.0, help="pause between saves")
    ap.add_argument("--keep", type=int, default=0, help="save_total_limit (0: keep all)")
    args = ap.parse_args(argv)
    planted = Planted.make(seed=args.seed, noise=args.noise)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    for step in (int(s) for s in args.steps.split(",")):
        tensors = planted.at(step)
        if args.layout == "hf":
            hf_save(args.run_dir, step, tensors, shards=args.shards, pause=args.pause)
            if args.keep:
                rotate(args.run_dir, args.keep)
        elif args.layout == "verl":
            verl_save(args.run_dir, step, tensors, pause=args.pause)
            if args.keep:
                rotate(args.run_dir, args.keep, "global_step_")
        else:
            file_save(args.run_dir, step, tensors)
        print(f"saved {step}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()


# --- helpers shared by the daemon tests ---------------------------------------------------------


def make_base(root: Path, seed: int = 0, **kw: float) -> tuple[Planted, Path]:
    """A planted trajectory and its base model written as an HF directory."""
    from tests.engine.planted import write_hf_checkpoint

    planted = Planted.make(seed=seed, **kw)
    base = write_hf_checkpoint(root / "base", planted.base)
    return planted, base


class Daemon:
    """``relexd watch`` as a real subprocess, logging JSON lines to a file."""

    def __init__(
        self, root: Path, run_dir: Path, base: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        import subprocess

        self.state = root / "state"
        self.log_path = root / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 — closed in stop()
        cmd = [
            sys.executable, "-m", "relexd", "watch", str(run_dir), "--base", str(base),
            "--state-dir", str(self.state), "--listen", "127.0.0.1:0", "--log-format", "json",
            *args,
        ]  # fmt: skip
        full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.url: str | None = None

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": line})
        return out

    def wait_for(self, predicate: object, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")

    def wait_url(self) -> str:
        def found() -> bool:
            for rec in self.logs():
                if rec.get("event") == "watching" and rec.get("listen"):
                    self.url = rec["listen"]
                    return True
            return False

        self.wait_for(found, what="startup")
        assert self.url
        return self.url

    def steps(self) -> list[int]:
        from relexd.state.store import read_snapshot

        try:
            return read_snapshot(self.state, load_small=False).meta.get("steps", [])
        except Exception:
            return []

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = self.get("/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def stop(self, timeout: float = 10.0) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

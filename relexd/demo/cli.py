"""``relexd demo``: a real RL run with the real daemon watching it, then an honest score table.

What runs: the demo trains the embedded policy (:mod:`relexd.demo.train`) in this process, with one
torch thread, writing a Hugging Face-style checkpoint per step into ``DIR/run``; meanwhile
``python -m relexd watch`` runs as a SUBPROCESS on that directory — the production code path, with
its Prometheus endpoint on a free local port — and keeps previews at 2×, 3× and 6× the newest
observed step in ``DIR/previews``. The live view reads the daemon only from the outside: its
``/metrics`` endpoint and its published state (:func:`relexd.state.store.read_snapshot`).

How the final table stays honest: the question is "having observed only the first K steps, how
good is relexd's preview of step 2K / 3K / 6K?". When training reaches step K (``--observe-fraction``
of the run) the trainer WAITS until the daemon has ingested checkpoint K and published its previews
for 2K, 3K and 6K (their manifests name K as the newest observed step); those previews are copied
to ``DIR/observed-previews`` and training resumes. Nothing after step K can have influenced them.
At the end every preview, the truly trained checkpoint at the same step and the last observed
checkpoint K are scored on held-out prompts with the training reward's exact expectation (and greedy
accuracy; :func:`relexd.demo.evaluate.score_checkpoint`), next to the forecast skill the daemon
reported.

The daemon also scores previews and checkpoints itself, through ``--eval 'python -m
relexd.demo.score {path}'`` — the path a user takes with lm-eval. Over the observed prefix training
runs in lockstep with it (see :data:`EVALS_BEFORE_CAPTURE`), and the final table adds what relexd's
evaluation ledger said at step K per horizon: realized advantage, lead streak, and whether
``RelexPreviewAhead`` would have fired.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from relexd.daemon.evaluations import EvalFigures, EvalLedger
from relexd.demo import bases, train
from relexd.demo.evaluate import Score, score_checkpoint
from relexd.engine.preview import MANIFEST
from relexd.state.store import read_snapshot

#: Previews kept ahead of training, as multiples of the newest observed step (issue 5, bench 5).
HORIZONS: tuple[int, ...] = (2, 3, 6)
DEFAULT_OBSERVE_FRACTION = 0.15
#: Longest wait for the daemon to catch up (at the capture step and at the end), seconds.
DAEMON_WAIT_S = 120.0
#: Longest wait for the daemon's evaluation queue to run dry (at the capture step, at the end).
EVAL_WAIT_S = 300.0
#: Evaluated preview refreshes before the capture step (``--eval-every`` = observed steps / this):
#: enough for a streak of leads and for realized validation at every horizon. The demo's trainer
#: takes ~0.4 s a step and the hook ~2.7 s an evaluation (an interpreter start, 1024 prompts), so
#: before the capture step training waits for each due evaluation, as if evaluation kept pace
#: with training (in a real run one sets --eval-every so that it does); otherwise newer previews
#: would keep superseding the queued ones and nothing would be evaluated before step K.
EVALS_BEFORE_CAPTURE = 5
#: Evaluated preview refreshes after the capture step: training's own checkpoints reaching the
#: captured previews' targets are evaluated whatever the cadence (they validate those previews).
EVALS_AFTER_CAPTURE = 4
#: Consecutive positive leads RelexPreviewAhead asks for (deploy/prometheus/relexd-alerts.yml).
AHEAD_STREAK = 3


@dataclass(frozen=True)
class Signals:
    """What relexd said at the capture step about the preview of one horizon: "trust" or not."""

    skill: float | None  # weight-space forecast skill at this horizon
    realized_advantage: float | None  # reward-space validation of earlier previews at it
    lead: float | None
    streak: int

    @property
    def skill_says_trust(self) -> bool:
        return self.skill is not None and self.skill >= 0

    @property
    def realized_says_trust(self) -> bool:
        return self.realized_advantage is not None and self.realized_advantage > 0

    @property
    def ahead_fires(self) -> bool:
        """RelexPreviewAhead's condition, as the alert rule states it."""
        return self.streak >= AHEAD_STREAK and self.realized_says_trust


def signals(view: DaemonView, horizon: int) -> Signals:
    label, target = f"{horizon}x", f"ahead:{horizon}x"
    ev = view.evaluations
    realized = ev.realized.get(label) if ev else None
    lead = ev.leads.get(target) if ev else None
    streak = lead[1] if lead is not None and lead[2] == label else 0
    return Signals(
        view.skills.get(label),
        None if realized is None else realized[1],
        None if lead is None else lead[0],
        streak,
    )


class DemoError(RuntimeError):
    """The demo could not complete (the daemon died or never caught up)."""


@dataclass
class DaemonView:
    """What the demo last saw of the daemon, from /metrics and the published state."""

    observed_step: int | None = None
    observed_count: int = 0
    energy: float | None = None
    r2: float | None = None
    drift: float | None = None
    skill: float | None = None  # at the 2x horizon
    skill_ratio: float | None = None
    #: forecast skill per horizon label ("2x", "3x", "6x")
    skills: dict[str, float] = field(default_factory=dict)
    previews_written: int = 0
    metrics_up: bool = False
    #: relexd's reward-space figures from its evaluation ledger (None: nothing evaluated yet)
    evaluations: EvalFigures | None = None


@dataclass
class Capture:
    """The daemon's view at the end of the observed prefix, and the previews it wrote then."""

    step: int
    view: DaemonView
    previews: dict[int, Path] = field(default_factory=dict)


@dataclass
class DemoResult:
    """Everything the final table shows."""

    observed_step: int
    steps: int
    base_score: Score
    observed_score: Score
    rows: list[tuple[int, int, Score, Score | None]]  # (factor, target, preview, trained)
    at_capture: DaemonView
    at_end: DaemonView
    reward_first: float
    reward_last: float

    def signals_at_capture(self) -> list[Signals]:
        """Per row (horizon), what relexd said when the previews were made."""
        return [signals(self.at_capture, h) for h, _, _, _ in self.rows]

    def preview_won(self) -> list[bool]:
        """Per row: did the preview score better than the last observed checkpoint?"""
        last = self.observed_score.expected_reward
        return [p.expected_reward > last for _, _, p, _ in self.rows]

    def recovered_shares(self) -> list[float | None]:
        """Per row, :func:`recovered_share` of the preview's expected reward (None if not trained)."""
        last = self.observed_score.expected_reward
        return [
            None if trained is None else recovered_share(p.expected_reward, trained.expected_reward, last)
            for _, _, p, trained in self.rows
        ]


def free_port() -> int:
    """A currently free local TCP port for the daemon's metrics endpoint."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``python -m relexd watch`` as a child process, observed only through its public surfaces."""

    def __init__(
        self,
        run_dir: Path,
        base: Path,
        state_dir: Path,
        preview_dir: Path,
        log_path: Path,
        eval_every: int = 1,
    ) -> None:
        self.state_dir = state_dir
        self.preview_dir = preview_dir
        self.port = free_port()
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "relexd", "watch", str(run_dir),
            "--base", str(base),
            "--state-dir", str(state_dir),
            "--preview-dir", str(preview_dir),
            "--preview-ahead", ",".join(str(h) for h in HORIZONS),
            # horizons default to the preview ratios: a 6x preview gets a 6x forecast skill.
            # The demo's scorer is the evaluation command, as lm-eval would be for a real model.
            "--eval", f"{sys.executable} -m relexd.demo.score {{path}}",
            "--eval-every", str(eval_every),
            "--listen", f"127.0.0.1:{self.port}",
            # A checkpoint lands every fraction of a second; the default 2 s quiet time would make
            # the daemon wait for a pause that never comes.
            "--debounce", "0.05",
            "--reconcile-interval", "2",
            "--log-format", "json",
        ]  # fmt: skip
        # One BLAS thread: the trainer has the other core (the demo's budget is 2 cores).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise if the daemon exited: the demo without it would be meaningless."""
        if not self.alive():
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise DemoError(f"relexd watch exited with status {self.proc.returncode}:\n{tail}")

    def poll(self) -> DaemonView:
        """Scrape /metrics (figures, progress) and fall back to the state for anything missing."""
        view = DaemonView()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
            view.metrics_up = True
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    _apply_sample(view, sample.name, sample.value, sample.labels)
        except OSError:
            pass
        try:
            meta = read_snapshot(self.state_dir, load_small=False).meta
        except Exception:  # a read racing a commit: the next poll will do
            meta = {}
        steps = meta.get("steps") or []
        if steps:
            view.observed_step = max(view.observed_step or 0, int(steps[-1]))
            view.observed_count = max(view.observed_count, len(steps))
            figures = meta.get("figures", {})
            view.energy = view.energy if view.energy is not None else figures.get("rank1_energy_ratio")
            view.r2 = view.r2 if view.r2 is not None else figures.get("fit_r2")
            view.drift = view.drift if view.drift is not None else figures.get("direction_drift")
            for f in meta.get("forecasts", []):
                if f.get("skill") is not None:
                    view.skills.setdefault(f["horizon"], f["skill"])
                    if view.skill is None and f["horizon"] == "2x":
                        view.skill, view.skill_ratio = f["skill"], f.get("ratio")
        view.evaluations = self.evaluations()
        return view

    def evaluations(self) -> EvalFigures | None:
        """The daemon's reward-space figures, read from its ledger (None before any)."""
        try:
            ledger = EvalLedger(self.state_dir, HORIZONS, read_only=True)
        except (OSError, ValueError):
            return None
        return ledger.figures() if ledger.records() else None

    def evaluations_pending(self) -> int:
        try:
            return len(EvalLedger(self.state_dir, HORIZONS, read_only=True).unfinished())
        except (OSError, ValueError):
            return 0

    def wait_evaluated(self, made_from: int, targets: list[int], timeout: float = EVAL_WAIT_S) -> None:
        """Block until the previews of ``targets`` made from ``made_from`` have been evaluated
        (and nothing else is pending)."""
        keys = {f"preview:{t}@{made_from}" for t in targets}
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                records = EvalLedger(self.state_dir, HORIZONS, read_only=True).records()
            except (OSError, ValueError):
                records = []
            status = {r["key"]: r["status"] for r in records}
            if keys <= status.keys() and "pending" not in status.values():
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"relexd's evaluations of step {made_from} did not finish within {timeout:.0f} s"
                )
            time.sleep(0.05)

    def wait_evaluations(self, timeout: float = EVAL_WAIT_S) -> None:
        """Block until the daemon's evaluation queue has run dry."""
        deadline = time.monotonic() + timeout
        while self.evaluations_pending():
            self.check()
            if time.monotonic() > deadline:
                raise DemoError(f"relexd's evaluations did not finish within {timeout:.0f} s")
            time.sleep(0.1)

    def wait_for(
        self, step: int, targets: list[int] | None = None, timeout: float = DAEMON_WAIT_S
    ) -> DaemonView:
        """Block until the daemon has observed ``step`` (and written previews of ``targets`` from it)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            view = self.poll()
            caught_up = view.observed_step is not None and view.observed_step >= step
            if caught_up and all(self._preview_from(t, step) for t in targets or ()):
                return view
            if time.monotonic() > deadline:
                raise DemoError(f"relexd did not observe step {step} within {timeout:.0f} s")
            time.sleep(0.05)

    def _preview_from(self, target: int, step: int) -> bool:
        try:
            doc = json.loads((self.preview_dir / f"step-{target}" / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return int(doc.get("newest_observed_step", -1)) == step

    def stop(self) -> None:
        """SIGTERM (the daemon shuts down cleanly), SIGKILL if it lingers."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _apply_sample(view: DaemonView, name: str, value: float, labels: dict[str, str]) -> None:
    if name == "relexd_last_checkpoint_step":
        view.observed_step = int(value)
    elif name == "relexd_observed_checkpoints":
        view.observed_count = int(value)
    elif name == "relexd_rank1_energy_ratio":
        view.energy = value
    elif name == "relexd_fit_r2":
        view.r2 = value
    elif name == "relexd_direction_drift":
        view.drift = value
    elif name == "relexd_forecast_skill" and "horizon" in labels:
        view.skills[labels["horizon"]] = value
        if labels["horizon"] == "2x":
            view.skill = value
    elif name == "relexd_forecast_horizon_ratio" and labels.get("horizon") == "2x":
        view.skill_ratio = value
    elif name == "relexd_previews_written_total":
        view.previews_written = int(value)


def _f(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


class Progress:
    """Live view on a terminal, plain progress lines otherwise (CI logs, pipes)."""

    def __init__(self, console: Console, steps: int, observe: int, lr: float) -> None:
        self.console = console
        self.steps, self.observe, self.lr = steps, observe, lr
        self.step = 0
        self.reward: float | None = None
        self.view = DaemonView()
        self.note = "warming up the base model"
        self.live: Live | None = None
        self._every = max(1, steps // 15)

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            self.live = Live(get_renderable=self.render, console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def event(self, text: str) -> None:
        """A one-off message (printed above the live view, or as a line)."""
        self.note = text
        self.console.print(text, highlight=False)

    def update(self, step: int, reward: float, view: DaemonView) -> None:
        self.step, self.reward, self.view = step, reward, view
        if self.live is None and (step % self._every == 0 or step == self.steps):
            self.console.print(self.line(), highlight=False)

    def line(self) -> str:
        v = self.view
        seen = "—" if v.observed_step is None else str(v.observed_step)
        return (
            f"step {self.step}/{self.steps} reward {_f(self.reward)} | relexd: observed {seen} "
            f"energy {_f(v.energy)} R² {_f(v.r2)} drift {_f(v.drift, '.1e')} "
            f"skill {_f(v.skill, '+.3f')} previews {v.previews_written}"
        )

    def render(self) -> Group:
        v = self.view
        t = Table(title=f"relexd demo — RL run, lr {self.lr:g}", show_header=False, min_width=60)
        t.add_row("training step", f"{self.step} / {self.steps}  (observed prefix ends at {self.observe})")
        t.add_row("mean sampled reward", _f(self.reward))
        t.add_row("relexd observed step", "—" if v.observed_step is None else str(v.observed_step))
        t.add_row("rank-1 energy ratio", _f(v.energy))
        t.add_row("fit R²", _f(v.r2))
        t.add_row("direction drift", _f(v.drift, ".1e"))
        ratio = f" (ratio {v.skill_ratio:.2f})" if v.skill_ratio else ""
        t.add_row("forecast skill", _f(v.skill, "+.3f") + ratio)
        endpoint = "up" if v.metrics_up else "—"
        t.add_row("previews written", f"{v.previews_written}  (metrics endpoint {endpoint})")
        return Group(t, Text(self.note, style="dim"))


def run_demo(
    workdir: Path,
    *,
    lr: float,
    steps: int,
    seed: int,
    observe_fraction: float,
    console: Console,
    sft_steps: int = train.SFT_STEPS,
    prompts_per_step: int = train.DEFAULT_PROMPTS_PER_STEP,
    cache_dir: Path | None = None,
) -> DemoResult:
    """Train, watch with the real daemon, capture the prefix-only previews, score them."""
    observe = max(2, round(observe_fraction * steps))
    run_dir, state_dir = workdir / "run", workdir / "relexd-state"
    preview_dir, captured_dir = workdir / "previews", workdir / "observed-previews"
    base = run_dir / train.BASE_DIR_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    train.configure_torch(1)

    progress = Progress(console, steps, observe, lr)
    with progress:
        t0 = time.perf_counter()
        source = bases.ensure_base(base, seed, train.Warmup(steps=sft_steps), cache_dir=cache_dir)
        how = f"by {sft_steps} supervised steps" if source is bases.BaseSource.TRAINED else source.value
        progress.event(f"base model θ₀ ready ({how}) in {time.perf_counter() - t0:.1f} s: {base}")

        every_before = max(1, observe // EVALS_BEFORE_CAPTURE)
        every_after = max(1, (steps - observe) // EVALS_AFTER_CAPTURE)
        daemon = Daemon(run_dir, base, state_dir, preview_dir, workdir / "relexd-watch.log", every_before)
        progress.event(
            f"relexd watch running (pid {daemon.proc.pid}, metrics http://127.0.0.1:{daemon.port}/metrics, "
            f"evaluating every {every_before} steps' previews with python -m relexd.demo.score)"
        )
        capture: Capture | None = None
        try:

            def on_step(info: train.StepInfo) -> None:
                nonlocal capture, daemon
                daemon.check()
                progress.update(info.step, info.mean_reward, daemon.poll())
                if info.step < observe:
                    # lockstep over the observed prefix: one preview refresh per step, so refresh
                    # number step − 1 is evaluated when it is a multiple of --eval-every
                    targets = [h * info.step for h in HORIZONS]
                    daemon.wait_for(info.step, targets)
                    if (info.step - 1) % every_before == 0:
                        daemon.wait_evaluated(info.step, targets)
                if info.step == observe:
                    targets = [h * observe for h in HORIZONS]
                    progress.event(f"step {observe} reached: waiting for relexd's previews made from it")
                    daemon.wait_for(observe, targets)
                    progress.event("waiting for relexd's evaluations of the observed steps")
                    daemon.wait_evaluations()
                    view = daemon.poll()
                    capture = Capture(observe, view)
                    captured_dir.mkdir(parents=True, exist_ok=True)
                    for t in targets:
                        dest = captured_dir / f"step-{t}"
                        shutil.copytree(preview_dir / f"step-{t}", dest, dirs_exist_ok=True)
                        capture.previews[t] = dest
                    progress.event(
                        f"captured relexd's previews of steps {', '.join(map(str, targets))} made from "
                        f"steps 1…{observe} only (energy {_f(view.energy)}, R² {_f(view.r2)}, "
                        f"skill {_f(view.skill, '+.3f')})"
                    )
                    # the rest of the run needs fewer evaluations: restart the daemon (its state
                    # and evaluation ledger carry over) with a sparser --eval-every
                    daemon.stop()
                    daemon = Daemon(
                        run_dir, base, state_dir, preview_dir, workdir / "relexd-watch-2.log", every_after
                    )

            summary = train.train_run(
                run_dir,
                steps=steps,
                lr=lr,
                seed=seed,
                prompts_per_step=prompts_per_step,
                num_threads=1,
                on_step=on_step,
            )
            progress.event(f"training done: {steps} steps in {summary.rl_seconds:.1f} s; waiting for relexd")
            daemon.wait_for(steps)
            daemon.wait_evaluations()
            end_view = daemon.poll()
            progress.update(steps, summary.mean_rewards[-1], end_view)
        finally:
            daemon.stop()

    assert capture is not None
    progress.event("scoring previews and checkpoints on held-out prompts")
    observed_score = score_checkpoint(run_dir / f"checkpoint-{observe}")
    rows = []
    for h in HORIZONS:
        t = h * observe
        trained = score_checkpoint(run_dir / f"checkpoint-{t}") if t <= steps else None
        rows.append((h, t, score_checkpoint(capture.previews[t]), trained))
    k = max(1, min(10, steps // 10))
    return DemoResult(
        observed_step=observe,
        steps=steps,
        base_score=summary.base_score,
        observed_score=observed_score,
        rows=rows,
        at_capture=capture.view,
        at_end=end_view,
        reward_first=sum(summary.mean_rewards[:k]) / k,
        reward_last=sum(summary.mean_rewards[-k:]) / k,
    )


def recovered_share(preview: float, trained: float, observed: float) -> float | None:
    """Share of training's gain from the last observed step to the target that the preview recovers.

    1 = as good as the trained checkpoint, 0 = no better than stopping at the last observed one,
    negative = worse than stopping. Undefined (None) when training gained less than 0.001 expected
    reward: a share of almost nothing would read as a large number that means nothing.
    """
    gain = trained - observed
    return None if abs(gain) < 1e-3 else (preview - observed) / gain


def print_result(result: DemoResult, console: Console) -> None:
    """The final table plus a verdict that only states what the numbers show."""
    k = result.observed_step
    table = Table(title=f"expected reward of previews made from steps 1…{k} vs. truly trained checkpoints")
    for col in ("horizon", "target step", "preview", "trained", f"last observed ({k})"):
        table.add_column(col, justify="right")
    table.add_column("gain recovered", justify="right")
    greedy = Table(title="greedy exact-answer accuracy of the same models")
    for col in ("target step", "preview", "trained", f"last observed ({k})"):
        greedy.add_column(col, justify="right")
    last = result.observed_score
    for (h, t, preview, trained), share in zip(result.rows, result.recovered_shares(), strict=True):
        table.add_row(
            f"{h}×",
            str(t),
            _f(preview.expected_reward, ".4f"),
            _f(trained.expected_reward, ".4f") if trained is not None else "not trained",
            _f(last.expected_reward, ".4f"),
            _f(None if share is None else 100 * share, "+.0f") + ("" if share is None else " %"),
        )
        greedy.add_row(
            str(t),
            _f(preview.greedy_accuracy),
            _f(trained.greedy_accuracy) if trained is not None else "not trained",
            _f(last.greedy_accuracy),
        )
    console.print(table)
    console.print(greedy)
    c, e = result.at_capture, result.at_end
    console.print(
        "expected reward = probability that one completion sampled as in training is exactly right, "
        f"averaged over held-out prompts (base θ₀: {result.base_score.expected_reward:.4f}, greedy "
        f"{result.base_score.greedy_accuracy:.3f}); mean sampled reward during training "
        f"{result.reward_first:.3f} → {result.reward_last:.3f}",
        highlight=False,
    )
    console.print(
        f"relexd at step {k}: rank-1 energy {_f(c.energy)}, R² {_f(c.r2)}, "
        f"forecast skill {_f(c.skill, '+.3f')}"
        + (f" (ratio {c.skill_ratio:.2f})" if c.skill_ratio else "")
        + f"; at step {result.steps}: energy {_f(e.energy)}, R² {_f(e.r2)}, forecast skill "
        f"{_f(e.skill, '+.3f')}",
        highlight=False,
    )
    console.print(_signals_table(result))
    console.print(verdict(result), highlight=False)


def _signals_table(result: DemoResult) -> Table:
    """relexd's own reward-space figures (from its --eval ledger), at capture and at the end."""
    k = result.observed_step
    table = Table(title=f"what relexd said at step {k} (its --eval ledger), and what happened")
    for col in ("horizon", f"skill at {k}", f"realized advantage at {k}", f"lead at {k} (in a row)",
                "RelexPreviewAhead", "realized share at end", "preview beat the last observed"):  # fmt: skip
        table.add_column(col, justify="right")
    end = result.at_end.evaluations
    for (h, _, _, _), sig, won in zip(
        result.rows, result.signals_at_capture(), result.preview_won(), strict=True
    ):
        real_end = end.realized.get(f"{h}x") if end else None
        table.add_row(
            f"{h}×",
            _f(sig.skill, "+.3f"),
            _f(sig.realized_advantage, "+.4f"),
            _f(sig.lead, "+.4f") + f" ({sig.streak})",
            "would fire" if sig.ahead_fires else "quiet",
            "—" if real_end is None or real_end[0] is None else f"{100 * real_end[0]:+.0f} %",
            "yes" if won else "no",
        )
    return table


def verdict(result: DemoResult) -> str:
    """One sentence on the 2× preview, judged by what relexd reported WHEN it was made (step K).

    The end-of-run skill is shown separately: no user deciding at step K could have seen it.
    """
    _, target, preview, _ = result.rows[0]
    k, c = result.observed_step, result.at_capture
    last = result.observed_score.expected_reward
    gain = preview.expected_reward - last
    parts = [
        f"at 2× (step {target}) the preview {'beats' if gain > 0 else 'does not beat'} the last observed "
        f"checkpoint ({gain:+.4f} expected reward)"
    ]
    share = result.recovered_shares()[0]
    if share is not None and share >= 0:
        parts.append(f"recovering {100 * share:.0f} % of what training gained from step {k} to {target}")
    elif share is not None:
        parts.append(f"worse than stopping at step {k} ({100 * share:.0f} % of training's gain)")
    if c.skill is None:
        parts.append(f"relexd had no forecast skill yet at step {k}")
    elif c.skill > 0:
        parts.append(f"relexd's skill at step {k} was {c.skill:+.3f} (it trusted the line)")
    else:
        parts.append(f"relexd's skill at step {k} was {c.skill:+.3f}: it warned not to trust the line")
    return "; ".join(parts)


def register(app: typer.Typer) -> None:
    """Add ``relexd demo`` to the application."""

    @app.command()
    def demo(
        lr: Annotated[
            float,
            typer.Option(help=f"RL learning rate (Adam); {train.COLLAPSE_LR:g} shows extrapolation failing."),
        ] = train.DEFAULT_LR,
        steps: Annotated[
            int, typer.Option(min=10, help="RL steps (one checkpoint each).")
        ] = train.DEFAULT_STEPS,
        keep: Annotated[
            Path | None, typer.Option(help="Keep the run, state, previews and logs in DIR.")
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed of every random stream.")] = 0,
        observe_fraction: Annotated[
            float,
            typer.Option(min=0.02, max=0.16, help="Fraction of the run relexd observes for the table."),
        ] = DEFAULT_OBSERVE_FRACTION,
        sft_steps: Annotated[int, typer.Option(hidden=True)] = train.SFT_STEPS,
        prompts_per_step: Annotated[int, typer.Option(hidden=True)] = train.DEFAULT_PROMPTS_PER_STEP,
    ) -> None:
        """Train a tiny policy with RL while the real `relexd watch` follows it; then score relexd's
        previews (made from the first steps only) against the truly trained checkpoints."""
        console = Console()
        workdir = keep if keep is not None else Path(tempfile.mkdtemp(prefix="relexd-demo-"))
        if keep is not None and any(keep.iterdir() if keep.is_dir() else ()):
            raise typer.BadParameter(f"{keep} is not empty", param_hint="--keep")
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            result = run_demo(
                workdir,
                lr=lr,
                steps=steps,
                seed=seed,
                observe_fraction=observe_fraction,
                console=console,
                sft_steps=sft_steps,
                prompts_per_step=prompts_per_step,
            )
            print_result(result, console)
        except DemoError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        finally:
            if keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
        where = f"; kept in {workdir}" if keep is not None else ""
        console.print(f"demo finished in {time.perf_counter() - t0:.0f} s{where}", highlight=False)

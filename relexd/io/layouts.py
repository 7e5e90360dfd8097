"""Where the checkpoints of a training run are, and when each one is complete.

Each trainer signals completion its own way (DESIGN.md §5): HF Trainer/TRL write
``trainer_state.json`` last, verl advances ``latest_checkpointed_iteration.txt``, NeMo-RL renames
``tmp_step_N`` to ``step_N``. OpenRLHF and plain layouts have no marker: :func:`scan_run` reports
them complete once a weights file is present, the daemon additionally waits for
:func:`size_signature` to be stable across two scans, and :func:`~relexd.io.reader.open_weights`
validates every file before anything is read.

:func:`scan_run` runs every few seconds, so it only lists directories, stats files and reads small
marker files; it never reads weights.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from relexd.io.formats import detect
from relexd.io.reader import ADAPTER_WEIGHTS, find_weights_file, is_temp_name

#: Layouts from most to least specific: when two candidates claim one step, the more specific
#: wins (then the one directly in the run directory, then the smaller path).
LAYOUTS = ("hf", "verl", "prime_rl", "nemo_rl", "openrlhf", "deepspeed", "trajectory", "plain", "file")
#: Sub-directories of the run directory where trainers commonly put their checkpoints
#: (``broadcasts``: prime-rl's per-step weight broadcasts, ``outputs/broadcasts/step_N``).
NESTED_DIRS = ("checkpoints", "ckpt", "ckpts", "broadcasts")
HF_MARKER = "trainer_state.json"
VERL_TRACKER = "latest_checkpointed_iteration.txt"
#: prime-rl writes it into ``broadcasts/step_N/`` once the broadcast is complete.
PRIME_RL_MARKER = "STABLE"
#: DeepSpeed's tag file in the checkpoint root, naming the newest ``global_stepN`` (written before
#: the final barrier, so the daemon also waits for stable sizes).
DEEPSPEED_LATEST = "latest"

_DIR_PATTERNS = (
    ("hf", re.compile(r"checkpoint-(\d+)")),
    ("verl", re.compile(r"global_step_(\d+)")),
    ("openrlhf", re.compile(r"global_step(\d+)_hf")),
    ("deepspeed", re.compile(r"global_step(\d+)")),
    ("plain", re.compile(r"(?:step|iter)[_-](\d+)")),  # may turn out to be NeMo-RL
)
_FILE_PATTERN = re.compile(r"(?:.*[_-])?(?:step|iter|checkpoint)[_-]?(\d+)\.safetensors")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".distcp", ".metadata", ".pt")


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run."""

    step: int
    path: Path  # the directory or file as the trainer names it (what appears and is rotated away)
    weights: Path  # what to pass to open_weights (directory or file)
    layout: str  # one of LAYOUTS
    #: The trainer's save cadence in steps where its own records say (HF ``trainer_state.json``'s
    #: ``save_steps``): which steps it saved, so relexd can tell which ones it never saw.
    save_interval: int | None = None


@dataclass(frozen=True)
class ScanResult:
    """What one scan of a run directory found.

    ``complete`` and ``pending`` are sorted by step and hold at most one ref per step.
    ``unsupported`` lists (path, reason in words) of finished checkpoints relexd cannot read
    (a verl checkpoint with neither rank files nor HF weights). A torch DCP save is pending until
    its ``.metadata`` is renamed into place.
    """

    complete: list[CheckpointRef]
    pending: list[CheckpointRef]
    unsupported: list[tuple[Path, str]]


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint's name (``checkpoint-N``, ``global_step_N``, ``global_stepN_hf``,
    ``step_N``, ``iter_000N``, ``…step_N.safetensors``); None for other and temporary names."""
    parsed = _parse_name(Path(path).name)
    return parsed[1] if parsed else None


def _parse_name(name: str) -> tuple[str, int] | None:
    if is_temp_name(name):
        return None
    for layout, pattern in _DIR_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return layout, int(match.group(1))
    match = _FILE_PATTERN.fullmatch(name)
    return ("file", int(match.group(1))) if match else None


def _has_weights(directory: Path) -> bool:
    """HF weights, or a native format relexd reads (verl FSDP rank files, a *complete* DCP)."""
    try:
        return (
            find_weights_file(directory) is not None
            or (directory / ADAPTER_WEIGHTS).is_file()
            or detect(directory) is not None
        )
    except (FileNotFoundError, NotADirectoryError):
        return False


def _dcp_dir(directory: Path) -> tuple[Path, bool] | None:
    """A torch DCP checkpoint in ``directory`` or one of its sub-directories: (where, complete)."""
    try:
        places = [directory, *(p for p in directory.iterdir() if p.is_dir())]
        for place in places:
            names = os.listdir(place)
            if any(name.endswith(".distcp") for name in names):
                return place, ".metadata" in names
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


#: Stands for "no tracker file at all" (as opposed to one being rewritten right now).
NO_TRACKER = -1


def _deepspeed_latest(path: Path) -> int | None:
    """The step of the tag in DeepSpeed's ``latest`` (``global_step120``); None if unreadable."""
    try:
        match = re.fullmatch(r"global_step(\d+)", path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(match.group(1)) if match else None


def _read_int(path: Path) -> int | None:
    """The integer in a small marker file; None when absent, empty or half-written."""
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return None


def _count(value: object, minimum: int) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= minimum else None


def _hf_record(directory: Path, fallback: int) -> tuple[int, int | None]:
    """(``global_step``, ``save_steps``) from ``trainer_state.json``; the name's step when unreadable.

    transformers writes the file with a plain ``open(..., "w")`` (``TrainerState.save_to_json``), so a
    scan can catch it empty or half-written: then the directory name's step stands.
    """
    try:
        record = json.loads((directory / HF_MARKER).read_text(encoding="utf-8"))
        step, interval = _count(record.get("global_step"), 0), _count(record.get("save_steps"), 1)
    except (OSError, ValueError, AttributeError):
        return fallback, None
    return (fallback if step is None else step), interval


def _verl_weights(directory: Path) -> Path:
    for candidate in (directory / "actor" / "huggingface", directory / "actor", directory):
        if _has_weights(candidate):
            return candidate
    return directory / "actor" / "huggingface"


def _nemo_weights(directory: Path) -> Path:
    weights = directory / "policy" / "weights"
    return weights / "model" if (weights / "model").is_dir() else weights


class _Scanner:
    """One scan of one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.latest_tag: int | None = None
        self.found: list[tuple[CheckpointRef, bool]] = []
        self.unsupported: list[tuple[Path, str]] = []

    def scan(self) -> None:
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return
        tracker = _read_int(self.root / VERL_TRACKER)
        if tracker is None and not (self.root / VERL_TRACKER).exists():
            tracker = NO_TRACKER
        self.latest_tag = _deepspeed_latest(self.root / DEEPSPEED_LATEST)
        for entry in entries:
            parsed = _parse_name(entry.name)
            if parsed is None:
                continue
            try:
                self._classify(Path(entry.path), *parsed, tracker)
            except (FileNotFoundError, NotADirectoryError):
                continue  # rotated away while we looked

    def _classify(self, path: Path, layout: str, step: int, tracker: int | None) -> None:
        if layout == "file":
            if path.is_file():
                self.found.append((CheckpointRef(step, path, path, "file"), True))
            return
        if not path.is_dir():
            return
        weights = path
        interval = None
        if layout == "hf":
            complete = (path / HF_MARKER).is_file()
            if complete:
                step, interval = _hf_record(path, step)
        elif layout == "verl" and tracker == NO_TRACKER and not (path / "actor").is_dir():
            # HF weights right in global_step_N/ and no tracker: the RELEX paper's released
            # trajectories (its download_rlvr_trajectory.py), not a verl run (that has actor/ and
            # advances the tracker); complete once validated and stable, like other marker-less ones
            layout, complete = "trajectory", _has_weights(path)
        elif layout == "verl":
            weights = _verl_weights(path)
            complete = tracker is not None and tracker >= step
        elif layout == "plain" and self.root.name == "broadcasts":
            layout, complete = "prime_rl", (path / PRIME_RL_MARKER).is_file()
        elif layout == "deepspeed":
            complete = self.latest_tag is not None and self.latest_tag >= step and _has_weights(path)
        elif layout == "plain" and (path / "policy").is_dir():
            layout, weights, complete = "nemo_rl", _nemo_weights(path), True
        else:  # openrlhf, plain: no marker
            complete = _has_weights(path)
        ref = CheckpointRef(step, path, weights, layout, interval)
        if _has_weights(weights):
            self.found.append((ref, complete))
            return
        dcp = _dcp_dir(weights)
        if dcp is not None:
            # DCP renames .metadata into place last: until then the save is not complete
            where, finished = dcp
            self.found.append((CheckpointRef(step, path, where, layout, interval), complete and finished))
        elif layout == "verl" and complete:
            self.unsupported.append(
                (
                    path,
                    "verl checkpoint with neither FSDP rank files nor HuggingFace weights",
                )
            )
        else:
            self.found.append((ref, complete))


def checkpoint_of(path: Path, run_dir: Path) -> tuple[int, Path] | None:
    """(step, checkpoint path) of the checkpoint that ``path`` (a file event's path) lies in.

    Lets an event reveal a checkpoint that is rotated away before any scan sees it.
    """
    try:
        parts = Path(path).relative_to(run_dir).parts
    except ValueError:
        return None
    if parts and parts[0] in NESTED_DIRS:
        run_dir, parts = run_dir / parts[0], parts[1:]
    parsed = _parse_name(parts[0]) if parts else None
    return (parsed[1], run_dir / parts[0]) if parsed else None


def scan_run(run_dir: Path) -> ScanResult:
    """Find the checkpoints of a run in ``run_dir`` and its ``checkpoints``/``ckpt``/``ckpts``
    sub-directory; temporary names are ignored and an entry vanishing mid-scan is skipped.

    When several candidates claim one step, the one of the most specific layout (order of
    :data:`LAYOUTS`) is kept, then the one directly in ``run_dir``, then the smaller path; if
    that one is pending, the step is pending.
    """
    run_dir = Path(run_dir)
    roots = [run_dir, *(run_dir / name for name in NESTED_DIRS)]
    best: dict[int, tuple[tuple[int, int, str], CheckpointRef, bool]] = {}
    unsupported: list[tuple[Path, str]] = []
    for depth, root in enumerate(roots):
        scanner = _Scanner(root)
        scanner.scan()
        unsupported.extend(scanner.unsupported)
        for ref, complete in scanner.found:
            rank = (LAYOUTS.index(ref.layout), min(depth, 1), str(ref.path))
            if ref.step not in best or rank < best[ref.step][0]:
                best[ref.step] = (rank, ref, complete)
    chosen = [best[step] for step in sorted(best)]
    return ScanResult(
        complete=[ref for _, ref, complete in chosen if complete],
        pending=[ref for _, ref, complete in chosen if not complete],
        unsupported=sorted(unsupported),
    )


#: Layouts without a completion marker: complete only once their files stop changing.
MARKERLESS = frozenset({"openrlhf", "plain", "file", "trajectory", "deepspeed"})


def completion_time(ref: CheckpointRef) -> float | None:
    """Unix time the trainer completed ``ref``: its marker's mtime (``trainer_state.json``, the verl
    tracker), else the checkpoint's own; None once it is gone."""
    marker = {
        "hf": ref.path / HF_MARKER,
        "verl": ref.path.parent / VERL_TRACKER,
        "prime_rl": ref.path / PRIME_RL_MARKER,
        "deepspeed": ref.path.parent / DEEPSPEED_LATEST,
    }.get(ref.layout, ref.path)
    try:
        return marker.stat().st_mtime
    except OSError:
        return None


#: (file relative to the weights, size, mtime_ns) of each weights file: see :func:`size_signature`.
Signature = tuple[tuple[str, int, int], ...]


def size_signature(ref: CheckpointRef) -> Signature:
    """(file relative to the weights, size, mtime_ns) of every weights file of ``ref``.

    Equal signatures from two scans some seconds apart tell the daemon that a marker-less
    checkpoint is no longer being written. Files vanishing meanwhile are left out.
    """
    weights = ref.weights
    try:
        if weights.is_dir():
            files = [
                entry
                for entry in weights.iterdir()
                if entry.name.endswith(_WEIGHT_SUFFIXES) and not is_temp_name(entry.name)
            ]
        else:
            files = [weights]
    except (FileNotFoundError, NotADirectoryError):
        return ()
    signature = []
    for file in sorted(files):
        try:
            stat = file.stat()
        except FileNotFoundError:
            continue
        signature.append((file.name, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def being_removed(ref: CheckpointRef, signature: Signature) -> bool:
    """Whether ``ref`` is going away: it, its weights, or a weights file it had when its
    ``signature`` was taken no longer exists.

    A rotation (``shutil.rmtree``, ``save_total_limit``) unlinks a checkpoint's entries one by one,
    in directory order, so a reader can land in the middle of it: weights gone while the directory,
    its config and its completion marker are still there. What it finds then is the trainer
    deleting the checkpoint, not bad input.
    """
    weights = ref.weights
    if not os.path.lexists(ref.path) or not os.path.lexists(weights):
        return True
    folder = weights if weights.is_dir() else weights.parent
    return any(not os.path.lexists(folder / name) for name, _, _ in signature)

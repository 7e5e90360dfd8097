"""Errors that name the file and the problem.

Every problem with an input checkpoint is a :class:`CheckpointError` carrying a short, stable
``reason`` code. The code is what the daemon counts under ``relexd_checkpoint_errors_total{reason}``
(low cardinality, never a path), the message is what a person reads.
"""

from __future__ import annotations

from pathlib import Path

#: The reason codes, one per kind of bad input. Keep this list short: it is a metric label.
REASONS = (
    "incomplete",  # not yet fully written (retry later; not an error when watching)
    "truncated",  # file shorter than its header says
    "corrupt_header",  # header length or JSON invalid, offsets not contiguous, bad dtype
    "missing_shard",  # a file named by the index does not exist
    "missing_tensor",  # a tensor of the base is absent from the checkpoint
    "unexpected_tensor",  # the checkpoint has a tensor the base lacks
    "shape_mismatch",  # shape differs from the base
    "dtype_mismatch",  # dtype differs from the base
    "non_finite",  # NaN or Inf in a tensor
    "tie_broken",  # a tensor tied to another in the base (lm_head ↔ embedding) differs from it
    "rotated",  # file deleted while being read (trainer rotation, not corruption)
    "permission",  # permission denied
    "out_of_order",  # step not newer than the last ingested one
    "unsupported",  # a format relexd cannot read (e.g. a pickle that is not weights)
    "io",  # any other OS error
)

#: Why a checkpoint the trainer saved was not read (``relexd_checkpoints_missed_total{reason}``).
MISSED_REASONS = (
    "rotated",  # seen, but deleted by the trainer before or while relexd read it
    "gap",  # never seen, but the trainer's records say it was saved
)


class RelexdError(Exception):
    """Base class of every error relexd raises on purpose (shown without a traceback)."""


class CheckpointError(RelexdError):
    """A checkpoint (or base) file is unusable; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, path: Path | str, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        self.path = Path(path)
        self.reason = reason
        self.message = message
        super().__init__(f"{self.path}: {message} [{reason}]")


class StateError(RelexdError):
    """The state directory cannot be used (format version, base fingerprint, corruption)."""


class ConfigError(RelexdError):
    """Options that contradict each other or name impossible values."""


class WorkerLost(RelexdError):
    """A cluster worker died or hung while computing its part of a generation; the generation was
    abandoned (the published state is unchanged) and the checkpoint is to be retried."""

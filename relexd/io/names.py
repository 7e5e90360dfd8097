"""Matching a native checkpoint's tensor names to the base model's.

Trainers wrap the model and the wrappers leak into state-dict keys: FSDP1's
``_fsdp_wrapped_module.``, activation checkpointing's ``_checkpoint_wrapped_module.``,
``torch.compile``'s ``_orig_mod.``, DDP/DeepSpeed's leading ``module.``, and the containers of a
DCP state dict (``model.``, ``app.model.``). :func:`match_names` strips the wrappers everywhere and
then the leading prefix under which most names match the base; names outside that prefix
(optimizer state) are not the model's and are left out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path

from relexd.errors import CheckpointError

#: Wrapper segments removed wherever they appear.
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: Leading prefixes tried, besides none.
PREFIXES = ("module.", "model.", "app.model.", "app.", "state_dict.")


def strip_wrappers(name: str) -> str:
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def match_names(stored: Iterable[str], base: Collection[str], where: Path) -> dict[str, str]:
    """Checkpoint name -> base name; raises a clear error when no prefix makes them match."""
    cleaned = {name: strip_wrappers(name) for name in stored}
    wanted = set(base)
    best: tuple[int, int, dict[str, str]] | None = None
    for prefix in ("", *PREFIXES):
        mapping = {n: c[len(prefix) :] for n, c in cleaned.items() if c.startswith(prefix)}
        score = len(set(mapping.values()) & wanted)
        if best is None or score > best[0]:
            best = (score, len(prefix), mapping)
    assert best is not None
    if best[0] == 0:
        theirs = sorted(cleaned)[:1] or ["(none)"]
        ours = sorted(wanted)[:1] or ["(none)"]
        raise CheckpointError(
            where,
            "missing_tensor",
            f"its tensor names do not match the base's, even without wrapper prefixes: the checkpoint "
            f"has e.g. {theirs[0]!r}, the base e.g. {ours[0]!r}",
        )
    return best[2]

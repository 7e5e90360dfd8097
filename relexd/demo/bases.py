"""Where the demo's base model θ₀ comes from: shipped with relexd, cached, or trained now.

RELEX starts from a model that is already partially competent, as every RLVR run starts from a
pretrained model. The demo's warm-up makes one (:func:`relexd.demo.train.sft_warmup`), but it
costs 50-130 s on two cores, most of a newcomer's first ``relexd demo``. So the bases of the seeds
the demo and the benchmarks use ship inside the package (``relexd/demo/pretrained/seed-N/``, 1.4 MB
each), like any small pretrained model, together with the recipe that made them. They are
reproduced, bit for bit, by::

    python -m relexd.demo.bases write          # retrain seeds 0-2 and rewrite the shipped files
    python -m relexd.demo.bases check --seed 0 # retrain one seed and compare with the shipped file

(``tests/demo/test_pretrained_bases.py`` runs the check for seed 0.) Any other seed or warm-up is
trained on first use and kept under ``~/.cache/relexd``, keyed by everything it depends on.

Bit for bit on any x86-64 CPU, not only the one that wrote them: a torch CPU wheel picks its kernels
by what the CPU offers (ATen's AVX2/AVX-512 builds, MKL's and oneDNN's code paths), and a different
vector width sums in a different order, so the same recipe trained on an Intel and on an AMD host
diverged (it did: bases written on an Intel host on 1 Dec did not reproduce on an AMD one). The shipped
bases are therefore trained in a child process pinned to code paths every x86-64 CPU runs the same
way (:data:`PORTABLE_ENV`; oneDNN off). That costs about twice the warm-up time, which only
``write``/``check`` pay; the demo itself loads the files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from enum import Enum
from pathlib import Path

import torch

from relexd.demo.train import Warmup, configure_torch, sft_warmup

#: The shipped bases: one directory per seed.
PRETRAINED_DIR = Path(__file__).with_name("pretrained")
SHIPPED_SEEDS = (0, 1, 2)
PROVENANCE_NAME = "provenance.json"
WEIGHTS_NAME = "model.safetensors"
#: The warm-up's thread count: part of what makes it reproducible bit for bit.
WARMUP_THREADS = 1
#: Code paths that do not depend on the CPU model: ATen's portable (non-SIMD-specific) kernels,
#: read once at torch's first dispatch, hence a child process; MKL's conditional numerical
#: reproducibility mode, whose results Intel documents as equal on Intel and compatible CPUs
#: whatever the alignment of the arrays. oneDNN, which has no such mode, is switched off in the child.
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT"}


class BaseSource(Enum):
    """Where :func:`ensure_base` found θ₀."""

    SHIPPED = "shipped with relexd"
    CACHE = "from the cache"
    TRAINED = "trained now"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/relexd`` or ``~/.cache/relexd``: where warm-up bases are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "relexd"


def shipped_dir(seed: int) -> Path:
    return PRETRAINED_DIR / f"seed-{seed}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_base(seed: int, warmup: Warmup) -> Path | None:
    """The shipped base made by exactly this recipe and seed, or None.

    A shipped base is used whatever torch runs the demo (it is a fixed model file, like a download
    from a hub); its provenance must name the same recipe and its weights the recorded hash.
    """
    where = shipped_dir(seed)
    try:
        provenance = json.loads((where / PROVENANCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if provenance.get("recipe") != warmup.recipe(seed):
        return None
    weights = where / WEIGHTS_NAME
    if not weights.is_file() or _sha256(weights) != provenance.get("sha256"):
        return None
    return where


def _copy_model(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, "config.json"):
        shutil.copyfile(src / name, dest / name)


def ensure_base(
    dest: Path, seed: int = 0, warmup: Warmup | None = None, *, cache_dir: Path | None = None
) -> BaseSource:
    """Put the warm-up base model θ₀ into ``dest``; says where it came from.

    Shipped first, then the cache (``cache_dir/demo-base-<key>``, default
    :func:`default_cache_dir`), else a warm-up now, whose result is cached: written aside and renamed
    into place, so a killed run never leaves a half-written base behind.
    """
    w = warmup or Warmup()
    shipped = shipped_base(seed, w)
    if shipped is not None:
        _copy_model(shipped, dest)
        return BaseSource.SHIPPED
    cache_root = cache_dir if cache_dir is not None else default_cache_dir()
    cached = cache_root / f"demo-base-{w.cache_key(seed)}"
    if (cached / WEIGHTS_NAME).is_file() and (cached / "config.json").is_file():
        _copy_model(cached, dest)
        return BaseSource.CACHE
    sft_warmup(seed, w).save_pretrained(dest)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-demo-base-", dir=cache_root))
        _copy_model(dest, staging)
        try:
            os.replace(staging, cached)
        except OSError:  # another run published it first: theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass  # an unwritable cache only costs the next run another warm-up
    return BaseSource.TRAINED


def write_shipped(seed: int, root: Path = PRETRAINED_DIR) -> Path:
    """Retrain the default base of ``seed`` and write it with its provenance under ``root``.

    The training runs in a child process with :data:`PORTABLE_ENV`, so the file does not depend on
    which x86-64 CPU this is.
    """
    subprocess.run(
        [sys.executable, "-m", "relexd.demo.bases", "_portable", "--seed", str(seed), "--root", str(root)],
        env=os.environ | PORTABLE_ENV,
        check=True,
    )
    return root / f"seed-{seed}"


def _write_portable(seed: int, root: Path) -> Path:
    """The child of :func:`write_shipped`: refuses to train unless the CPU pinning took effect."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT" or os.environ.get("MKL_CBWR") != PORTABLE_ENV["MKL_CBWR"]:
        raise RuntimeError(f"not pinned to portable kernels (ATen: {capability}); use write_shipped")
    torch.backends.mkldnn.enabled = False
    configure_torch(WARMUP_THREADS)
    warmup = Warmup()
    where = root / f"seed-{seed}"
    sft_warmup(seed, warmup).save_pretrained(where)
    (where / WEIGHTS_NAME).chmod(0o644)  # package data: readable by whoever runs the demo
    provenance = {
        "recipe": warmup.recipe(seed),
        "threads": WARMUP_THREADS,
        "portable_env": PORTABLE_ENV,
        "onednn": False,
        "torch": torch.__version__,
        "sha256": _sha256(where / WEIGHTS_NAME),
        "reproduce": f"python -m relexd.demo.bases write --seeds {seed}",
    }
    (where / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
    return where


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relexd.demo.bases", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    write = verbs.add_parser("write", help="retrain the shipped bases and rewrite their files")
    write.add_argument("--seeds", type=int, nargs="+", default=list(SHIPPED_SEEDS))
    check = verbs.add_parser("check", help="retrain one seed and compare with its shipped file")
    check.add_argument("--seed", type=int, default=0)
    portable = verbs.add_parser("_portable")  # write_shipped's child; not for direct use
    portable.add_argument("--seed", type=int, required=True)
    portable.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.verb == "_portable":
        _write_portable(args.seed, args.root)
        return 0
    if args.verb == "write":
        for seed in args.seeds:
            print(f"wrote {write_shipped(seed)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_shipped(args.seed, Path(tmp))
        same = _sha256(fresh / WEIGHTS_NAME) == _sha256(shipped_dir(args.seed) / WEIGHTS_NAME)
    print(
        f"seed {args.seed}: " + ("identical to the shipped base" if same else "DIFFERS from the shipped base")
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(_main())

"""Ingestion streams tensor by tensor: peak RSS is bounded by the largest tensor, not the model.

The peak is read from /proc (VmHWM, reset through clear_refs once the engine is open) rather than
getrusage: ru_maxrss survives exec on Linux, so a child would report its parent's peak.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from relexd.io.safetensors_file import StreamingSafetensorsWriter

LARGEST = 8_000_000  # elements: 32 MB in float32
OTHERS = 12
OTHER = 7_700_000  # 12 × 7.7M + 8M ≈ 100M bf16 elements ≈ 200 MB per checkpoint
MB = 1 << 20


def write_model(path: Path, scale: float) -> None:
    """A ~200 MB bf16 checkpoint written tensor by tensor (the test itself must not hold it)."""
    path.mkdir(parents=True)
    names = {"big.weight": LARGEST} | {f"layer{i}.weight": OTHER for i in range(OTHERS)}
    specs = {n: (torch.bfloat16, (numel,)) for n, numel in names.items()}
    with StreamingSafetensorsWriter(path / "model.safetensors", specs, {"format": "pt"}) as w:
        for i, (name, numel) in enumerate(names.items()):
            base = torch.randn(numel, generator=torch.Generator().manual_seed(i))
            w.append(name, (base * (1.0 + scale)).to(torch.bfloat16))


PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from relexd.engine import Engine, EngineConfig

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    root = Path(sys.argv[1])
    engine = Engine(root / "state", root / "base", EngineConfig(), threads=1)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = status("VmRSS")
    for step in (1, 2):  # the second ingest reads the old sketch and writes an anchor
        engine.ingest(root / f"ckpt{step}", step)
    engine.write_preview(10, root / "previews")
    print(before, status("VmHWM"))
    """
)


def probe_peak_growth(root: Path) -> int:
    """Peak RSS growth (bytes) of two ingests of root/ckpt{1,2} over root/base and a preview."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(root)], capture_output=True, text=True, check=True)
    before, after = (int(v) for v in out.stdout.split())
    growth = after - before
    largest_f32 = LARGEST * 4
    # a fixed allowance for chunk temporaries and allocator slack, well below one checkpoint (200 MB)
    assert growth < 2 * largest_f32 + 48 * MB, f"peak RSS grew by {growth / MB:.0f} MB"
    assert growth > 0.5 * largest_f32, "the probe must see at least one tensor in memory"
    return growth


def test_peak_rss_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    write_model(tmp_path / "base", 0.0)
    for step in (1, 2):
        write_model(tmp_path / f"ckpt{step}", 0.01 * step)
    probe_peak_growth(tmp_path)

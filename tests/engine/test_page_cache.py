"""When the state outgrows the page cache: the memory the host says it could give it, capped by
relexd's cgroup."""

from __future__ import annotations

from pathlib import Path

from relexd.engine.page_cache import page_cache_room, state_outgrows_page_cache

MEMINFO = "MemTotal:       24576000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


def _host(tmp_path: Path, meminfo: str = MEMINFO, cgroup: str = "0::/system.slice/relexd.service\n",
          memory_max: str | None = None) -> tuple[Path, Path, Path]:  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "meminfo").write_text(meminfo)
    (tmp_path / "cgroup").write_text(cgroup)
    root = tmp_path / "sys"
    if memory_max is not None:
        (root / "system.slice" / "relexd.service").mkdir(parents=True)
        (root / "system.slice" / "relexd.service" / "memory.max").write_text(memory_max + "\n")
    return tmp_path / "meminfo", tmp_path / "cgroup", root


def test_room_is_mem_available(tmp_path: Path) -> None:
    assert page_cache_room(*_host(tmp_path)) == 20000000 * 1024


def test_a_cgroup_memory_limit_caps_the_room(tmp_path: Path) -> None:
    assert page_cache_room(*_host(tmp_path, memory_max=str(8 << 30))) == 8 << 30


def test_a_limit_up_the_tree_caps_the_room_too(tmp_path: Path) -> None:
    meminfo, cgroup, root = _host(tmp_path, memory_max="max")
    (root / "system.slice" / "memory.max").write_text(f"{6 << 30}\n")
    assert page_cache_room(meminfo, cgroup, root) == 6 << 30


def test_an_unlimited_or_unknown_cgroup_leaves_the_room(tmp_path: Path) -> None:
    assert page_cache_room(*_host(tmp_path, memory_max="max")) == 20000000 * 1024
    assert page_cache_room(*_host(tmp_path / "v1", cgroup="12:memory:/user.slice\n")) == 20000000 * 1024


def test_a_host_that_does_not_say_drops_nothing(tmp_path: Path) -> None:
    assert page_cache_room(tmp_path / "absent", tmp_path / "absent", tmp_path) is None
    assert page_cache_room(*_host(tmp_path, meminfo="MemTotal: 1 kB\n")) is None
    assert not state_outgrows_page_cache(1 << 60, None)


def test_outgrows_only_above_the_room() -> None:
    assert state_outgrows_page_cache(101, 100)
    assert not state_outgrows_page_cache(100, 100)


def test_this_host_reports_its_room() -> None:
    room = page_cache_room()
    assert room is None or room > 0

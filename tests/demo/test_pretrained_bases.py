"""The shipped bases are what their recipe makes.

Bit for bit on the machine that wrote them; on another CPU the same pinned recipe gives other bytes
(measured: relexd/demo/bases.py's docstring), so there the retrained base must score as the shipped
one does, and the recipe must still be deterministic on this machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from relexd.demo import bases, train
from relexd.demo.evaluate import Score


@pytest.mark.slow
def test_retraining_seed_0_reproduces_the_shipped_base(tmp_path: Path) -> None:
    result = bases.check(0, tmp_path)
    assert result.ok, result.describe(0)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_recipe_is_deterministic_on_this_machine_and_a_short_one_is_not_the_shipped_base(
    tmp_path: Path,
) -> None:
    short = train.Warmup(steps=40)
    first = bases.write_shipped(0, tmp_path / "a", short)
    second = bases.write_shipped(0, tmp_path / "b", short)
    assert _sha256(first / bases.WEIGHTS_NAME) == _sha256(second / bases.WEIGHTS_NAME)
    provenance = json.loads((first / bases.PROVENANCE_NAME).read_text())
    assert provenance["written_on"] == bases.machine()
    assert provenance["recipe"] == short.recipe(0)
    result = bases.compare(first, bases.shipped_dir(0))
    assert not result.identical and not result.equivalent and not result.ok
    assert "NOT as good as" in result.describe(0)


def test_on_the_machine_that_wrote_it_only_identical_bytes_pass(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    shutil.copytree(bases.shipped_dir(0), shipped)
    provenance = json.loads((shipped / bases.PROVENANCE_NAME).read_text())
    (shipped / bases.PROVENANCE_NAME).write_text(json.dumps(provenance | {"written_on": bases.machine()}))
    fresh = tmp_path / "fresh"
    shutil.copytree(shipped, fresh)
    assert bases.compare(fresh, shipped).ok
    weights = load_file(str(fresh / bases.WEIGHTS_NAME))
    name = sorted(weights)[0]
    flat = weights[name].view(-1)
    flat[0] = flat[0].nextafter(flat[0] + 1)  # one float, one ulp: scores the same
    save_file(weights, str(fresh / bases.WEIGHTS_NAME), metadata={"format": "pt"})
    result = bases.compare(fresh, shipped)
    assert result.same_machine and not result.identical and result.equivalent
    assert not result.ok
    assert "DIFFERS" in result.describe(0)


@pytest.mark.parametrize(
    ("identical", "same_machine", "fresh", "ok"),
    [
        (True, True, Score(0.24, 1.0), True),
        (False, True, Score(0.24, 1.0), False),
        (False, False, Score(0.245, 1.0), True),
        (False, False, Score(0.26, 1.0), False),
        (False, False, Score(0.24, 0.98), False),
    ],
)
def test_verdict(identical: bool, same_machine: bool, fresh: Score, ok: bool) -> None:
    result = bases.Reproduction(identical, same_machine, shipped=Score(0.24, 1.0), fresh=fresh)
    assert result.ok is ok


@pytest.mark.parametrize("ok", [True, False])
def test_check_command_prints_the_verdict_and_exits_by_it(
    ok: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = Score(0.24, 1.0) if ok else Score(0.0, 0.0)
    verdict = bases.Reproduction(False, False, shipped=Score(0.24, 1.0), fresh=fresh)
    monkeypatch.setattr(bases, "check", lambda seed, scratch: verdict)
    assert bases._main(["check", "--seed", "0"]) == (0 if ok else 1)
    assert capsys.readouterr().out.strip() == verdict.describe(0)

"""The testbed recipes as a user runs them: scripts/check_recipes.py and
scripts/reproduce_entropy_mechanism.py through their command lines, on shipped configs (sizes overridden)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
FAST = [*TINY, "sampler.max_new_tokens=12", "data.val_size=8", "logging.val_samples=2", "logging.pass_k=[1,2]"]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_check_recipes_runs_shipped_configs_and_tabulates_start_and_end(tmp_path, tiny_cache, capsys):
    check = script("check_recipes")
    out = tmp_path / "rc"
    code = check.main(["grpo", "clip_cov", "--steps", "2", "--jobs", "2", "--out", str(out), "--", *FAST])
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith(("grpo ", "clip_cov "))]
    assert len(lines) == 2, text
    for line in lines:
        cells = line.split()
        acc0, acc1 = float(cells[1]), float(cells[2])
        assert 0 <= acc0 <= 1 and 0 <= acc1 <= 1
        assert ("LOSES ACCURACY" in line) == (acc1 < acc0)
    assert code == (1 if "LOSES ACCURACY" in text else 0)
    assert (out / "grpo" / "done.json").is_file() and (out / "clip_cov" / "done.json").is_file()
    # a second call reads the finished runs instead of training again
    before = (out / "grpo" / "done.json").stat().st_mtime_ns
    check.main(["grpo", "--steps", "2", "--out", str(out), "--", *FAST])
    assert (out / "grpo" / "done.json").stat().st_mtime_ns == before
    assert "fit --config" not in capsys.readouterr().out


def test_check_recipes_names_an_unknown_config():
    check = script("check_recipes")
    with pytest.raises(SystemExit, match="no configs/clipcov.yaml; shipped: .*clip_cov"):
        check.main(["clipcov"])
    with pytest.raises(SystemExit, match="--jobs 0 must be >= 1"):
        check.main(["grpo", "--jobs", "0"])


def test_law_fit_recovers_known_coefficients():
    repro = script("reproduce_entropy_mechanism")
    h = np.array([0.05, 0.2, 0.4, 0.7, 1.0])
    r = -0.3 * np.exp(h) + 0.9  # R = -a e^H + b with a = 0.3, b = 0.9: ceiling at H = 0 is 0.6
    a, b = repro.fit_law(h, r)
    assert a == pytest.approx(0.3, abs=1e-9) and b == pytest.approx(0.9, abs=1e-9)
    noisy = r + np.array([0.01, -0.01, 0.01, -0.01, 0.0])
    a2, b2 = repro.fit_law(h, noisy)
    # least squares in exp(H): the same closed form numpy's polyfit gives on (e^H, R)
    slope, intercept = np.polyfit(np.exp(h), noisy, 1)
    assert a2 == pytest.approx(-slope) and b2 == pytest.approx(intercept)


def test_reproduction_runs_its_sweep_and_draws_the_figures(tmp_path, tiny_cache):
    repro = script("reproduce_entropy_mechanism")
    sweep = tmp_path / "mech.yaml"
    configs = ", ".join(str(ROOT / "configs" / f"{n}.yaml") for n in ("grpo", "clip_cov"))
    sweep.write_text(f"name: mech\nseeds: [0, 1]\ngrid: {{config: [{configs}]}}\n")
    overrides = [*FAST, "trainer.max_steps=2", "logging.plot=false"]
    assert repro.main(["--sweep", str(sweep), "--root", str(tmp_path / "runs"), "--", *overrides]) == 0
    out = next(p for p in (tmp_path / "runs").glob("mech-*") if p.is_dir())  # the overrides: its own directory
    assert (out / "entropy_mechanism.png").stat().st_size > 10_000
    table = (out / "entropy_mechanism.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == {"grpo", "clip_cov"}
    assert all(line.split("|")[2].strip() == "2" for line in rows.values())  # two seeds each
    cells = rows["grpo"].split("|")[3].strip()  # entropy at the start, mean +- std over seeds
    assert "±" in cells and not math.isnan(float(cells.split("±")[0]))

import csv
import os
from pathlib import Path

import pytest

from lightning_entropy.config import ConfigError
from lightning_entropy.sweep import check_runs, load_sweep, run_sweep

from .conftest import TINY

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_expands_and_validates(path):
    spec, runs = load_sweep(path)
    assert runs
    check_runs(spec, runs)


def write(tmp_path, text):
    f = tmp_path / "grid.yaml"
    f.write_text(text)
    return f


def test_grid_expands_to_every_combination_and_seed(tmp_path):
    f = write(
        tmp_path,
        """
name: g
overrides: [trainer.max_steps=3]
seeds: [0, 1]
grid:
  loss: [{name: ppo, eps_high: 0.28}, {name: kl_cov}]
  optim.lr: [1e-4, 3e-4]
""",
    )
    spec, runs = load_sweep(f)
    assert len(runs) == 2 * 2 * 2
    first = runs[0]
    assert first.name == "ppo-eps_high0.28__lr0.0001__seed0"
    assert first.overrides == [
        "trainer.max_steps=3",
        "loss.name=ppo",
        "loss.eps_high=0.28",
        "optim.lr=0.0001",
        "seed=0",
    ]
    assert len({r.name for r in runs}) == len(runs)
    check_runs(spec, runs)


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "grid: {loss.name: [ppo, clipcov]}",
            "sweep run 'clipcov'.*unknown loss 'clipcov'.*did you mean 'clip_cov'",
        ),
        ("grid: {optim.lrr: [1]}", "optim.lrr"),
        ("grid: {}", "'grid' must map"),
        ("grid: {loss.name: [ppo]}\nlaunch: slurm", "unknown sweep key"),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(tmp_path, text, match):
    f = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        spec, runs = load_sweep(f)
        check_runs(spec, runs)
    assert not (tmp_path / "runs").exists()


def test_local_sweep_runs_tabulates_and_resumes(tmp_path, tiny_cache):
    overrides = ", ".join(f"'{o}'" for o in [*TINY, "trainer.max_steps=2"])
    f = write(
        tmp_path,
        f"""
name: tiny
overrides: [{overrides}]
grid:
  advantage.name: [grpo, rloo]
""",
    )
    os.environ.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    assert run_sweep(f, root=str(tmp_path / "out")) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "tiny" / "results.csv")))
    assert [r["run"] for r in rows] == ["grpo", "rloo"]
    assert all(r["val/acc"] != "nan" and r["train/entropy"] != "nan" for r in rows)
    # launching again finds both runs finished and reruns nothing
    before = (tmp_path / "out" / "tiny" / "grpo" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    assert run_sweep(f, root=str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "tiny" / "grpo" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before

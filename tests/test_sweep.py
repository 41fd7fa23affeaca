import csv
import json
import math
import os
import shlex
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_entropy.__main__ import main
from lightning_entropy.completion import mark_finished, read_marker
from lightning_entropy.config import ConfigError
from lightning_entropy.report import read_metrics
from lightning_entropy.sweep import check_runs, load_sweep, run_sweep, slot_env
from lightning_entropy.sweep_results import point_curves, results_by_point, results_table

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


def test_grid_over_recipe_files_runs_each_file_with_its_base(tmp_path, capsys):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "bed.yaml").write_text("optim: {lr: 3.0e-4}\nsampler: {max_new_tokens: 5}\n")
    (tmp_path / "recipes" / "grpo.yaml").write_text("base: bed.yaml\n")
    (tmp_path / "recipes" / "clip_cov.yaml").write_text("base: bed.yaml\nloss: {name: clip_cov}\n")
    f = write(
        tmp_path,
        "name: g\noverrides: [trainer.max_steps=3]\nseeds: [0, 1]\n"
        "grid:\n  config: [recipes/grpo.yaml, recipes/clip_cov.yaml]\n  optim.lr: [1e-4]\n",
    )
    spec, runs = load_sweep(f)
    assert [r.name for r in runs] == [
        "grpo__lr0.0001__seed0",
        "grpo__lr0.0001__seed1",
        "clip_cov__lr0.0001__seed0",
        "clip_cov__lr0.0001__seed1",
    ]
    assert runs[2].config == str(tmp_path / "recipes" / "clip_cov.yaml")
    assert runs[2].overrides == ["trainer.max_steps=3", "optim.lr=0.0001", "seed=0"]  # no config= override
    check_runs(spec, runs)
    assert main(["sweep", str(f), "--root", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = [shlex.split(x) for x in capsys.readouterr().out.splitlines() if x.startswith("python")]
    assert [line[line.index("--config") + 1] for line in lines] == [r.config for r in runs]
    f.write_text("grid: {config: [recipes/nope.yaml]}")
    with pytest.raises(ConfigError, match=r"grid.yaml: grid 'config': file not found: .*nope.yaml"):
        load_sweep(f)


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


def tiny_sweep(tmp_path, grid: str, extra: tuple[str, ...] = (), seeds: str = "") -> Path:
    overrides = ", ".join(f"'{o}'" for o in [*TINY, "trainer.max_steps=2", *extra])
    return write(tmp_path, f"name: tiny\noverrides: [{overrides}]\n{seeds}grid:\n{grid}\n")


def test_local_sweep_finishes_tabulates_resumes_and_skips(tmp_path, tiny_cache, capsys):
    f = tiny_sweep(
        tmp_path,
        "  advantage.name: [grpo, rloo]",
        ("logging.ckpt_every=1", "logging.val_every=1"),
        seeds="seeds: [0, 1]\n",
    )
    out = tmp_path / "out" / "tiny"
    os.environ.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    assert run_sweep(f, root=str(tmp_path / "out")) == 0
    names = ["grpo__seed0", "grpo__seed1", "rloo__seed0", "rloo__seed1"]
    markers = {n: read_marker(out / n) for n in names}
    assert all(m is not None and m["rl_steps"] == 2 for m in markers.values())
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["run"] for r in rows] == names and {r["status"] for r in rows} == {"finished"}
    # the table reports the marker's final metrics
    for r in rows:
        assert float(r["train/entropy"]) == pytest.approx(markers[r["run"]]["metrics"]["train/entropy"])
    points = list(csv.DictReader(open(out / "results_by_point.csv")))
    assert [(p["point"], p["finished"], p["seeds"]) for p in points] == [
        ("grpo", "2", "2"),
        ("rloo", "2", "2"),
    ]
    ent = [markers[f"grpo__seed{s}"]["metrics"]["train/entropy"] for s in (0, 1)]
    assert float(points[0]["train/entropy_mean"]) == pytest.approx(statistics.fmean(ent))
    assert float(points[0]["train/entropy_std"]) == pytest.approx(statistics.stdev(ent))
    # overlay: per point, the mean and std over seeds of each step's value
    runs = load_sweep(f)[1]
    curves = point_curves(out, runs, "val/acc")
    seeds = [dict(read_metrics(out / f"rloo__seed{s}")["val/acc"]) for s in (0, 1)]
    steps, mean, std = curves["rloo"]
    assert steps == [0, 1, 2]
    assert mean == pytest.approx([(seeds[0][t] + seeds[1][t]) / 2 for t in steps])
    assert std == pytest.approx([statistics.stdev([seeds[0][t], seeds[1][t]]) for t in steps])
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rloo__seed1 killed after its step-1 checkpoint: last.ckpt, no marker; grpo__seed1 died before
    # its first checkpoint (a directory and nothing to resume from); grpo__seed0 was killed between its
    # final checkpoint and the marker
    killed = out / "rloo__seed1"
    (out / "grpo__seed0" / "done.json").unlink()
    os.replace(killed / "checkpoints" / "optstep1.ckpt", killed / "checkpoints" / "last.ckpt")
    (killed / "done.json").unlink()
    shutil.rmtree(out / "grpo__seed1" / "checkpoints")
    (out / "grpo__seed1" / "done.json").unlink()
    results_table(out, runs)
    rows = {r["run"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["rloo__seed1"]["status"] == "unfinished"
    assert rows["rloo__seed1"]["train/entropy"] == "" and rows["rloo__seed1"]["rl_steps"] == ""
    results_by_point(out, runs)
    grpo, rloo = csv.DictReader(open(out / "results_by_point.csv"))
    assert (grpo["finished"], grpo["train/entropy_mean"], grpo["train/entropy_std"]) == ("0", "", "")
    assert (rloo["finished"], rloo["train/entropy_std"]) == ("1", "")
    assert float(rloo["train/entropy_mean"]) == pytest.approx(
        markers["rloo__seed0"]["metrics"]["train/entropy"]
    )

    capsys.readouterr()
    assert main(["sweep", str(f), "--root", str(tmp_path / "out"), "--dry-run"]) == 0
    commands = [
        shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("python")
    ]
    # the stale run starts over from its grid overrides, killed ones resume, finished ones do not appear
    assert len(commands) == 3
    assert commands[0][4:6] == ["--resume", str(out / "grpo__seed0" / "checkpoints" / "last.ckpt")]
    assert "logging.name=grpo__seed1" in commands[1] and "--resume" not in commands[1]
    last = str(killed / "checkpoints" / "last.ckpt")
    assert commands[2] == [
        "python",
        "-m",
        "lightning_entropy",
        "fit",
        "--resume",
        last,
        "logging.progress=false",
    ]

    untouched = (out / "rloo__seed0" / "done.json").stat().st_mtime_ns
    assert run_sweep(f, root=str(tmp_path / "out"), jobs=2) == 0  # the 3 unfinished runs, 2 at a time
    assert (out / "rloo__seed0" / "done.json").stat().st_mtime_ns == untouched
    assert not list((out / "rloo__seed0").glob("config.resume-*.yaml"))
    # resumed at max_steps: nothing left to train, but now it has its marker
    assert len(list((out / "grpo__seed0").glob("config.resume-*.yaml"))) == 1
    assert read_marker(out / "grpo__seed0")["optimizer_steps"] == 2
    # the killed run continued from its checkpoint (a resume config, a second log version) and finished
    assert len(list(killed.glob("config.resume-*.yaml"))) == 1
    assert sorted(p.name for p in (killed / "logs").iterdir()) == ["version_0", "version_1"]
    assert read_marker(killed)["rl_steps"] == 2
    # the run with nothing to resume was kept aside and started over
    assert [p.name.rsplit("-", 2)[0] for p in (out / ".stale").iterdir()] == ["grpo__seed1"]
    assert read_marker(out / "grpo__seed1")["rl_steps"] == 2
    assert {r["status"] for r in csv.DictReader(open(out / "results.csv"))} == {"finished"}


def test_parallel_slots_share_out_threads_and_gpus_unless_the_caller_set_them():
    assert slot_env(0, 1, {"A": "1"}, cpus=16, gpus=8) == {"A": "1"}  # one at a time: untouched
    assert slot_env(1, 4, {}, cpus=16, gpus=0) == {"OMP_NUM_THREADS": "4"}
    assert slot_env(1, 4, {}, cpus=16, gpus=8) == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "1,5"}
    assert slot_env(2, 3, {}, cpus=2, gpus=2)["OMP_NUM_THREADS"] == "1"  # fewer GPUs than slots: none given
    assert "CUDA_VISIBLE_DEVICES" not in slot_env(2, 3, {}, cpus=2, gpus=2)
    mine = {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "7"}
    assert slot_env(0, 8, mine, cpus=64, gpus=8) == mine


def test_jobs_are_refused_below_one_and_on_slurm(tmp_path):
    f = tiny_sweep(tmp_path, "  advantage.name: [grpo]", ())
    with pytest.raises(ConfigError, match="--jobs 0: must be >= 1"):
        run_sweep(f, root=str(tmp_path / "out"), jobs=0)
    f.write_text(f.read_text() + "launcher: slurm\n")
    with pytest.raises(ConfigError, match="--jobs 2 applies to the local launcher"):
        run_sweep(f, root=str(tmp_path / "out"), jobs=2)
    assert not (tmp_path / "out").exists()


def test_run_name_collisions_fail_up_front(tmp_path):
    f = write(tmp_path, "grid: {data.prompt_key: ['a b', a_b]}")
    with pytest.raises(ConfigError) as err:
        load_sweep(f)
    msg = str(err.value)
    assert "\n" not in msg
    assert "data.prompt_key: 'a b' vs 'a_b'" in msg and "same run directory 'a_b'" in msg


def test_dry_run_prints_shell_quoted_commands(tmp_path, capsys):
    f = write(tmp_path, "grid: {data.prompt_key: ['a b', \"it's\"]}")
    assert main(["sweep", str(f), "--root", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python")]
    assert [a for line in lines for a in shlex.split(line) if a.startswith("data.prompt_key")] == [
        "data.prompt_key=a b",
        "data.prompt_key=it's",
    ]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "rank0, status, step, written",
    [
        (True, "finished", 4, True),
        (False, "finished", 4, False),  # only global rank 0 writes
        (True, "finished", 3, False),  # stopped early (should_stop) before max_steps
        (True, "interrupted", 4, False),
    ],
)
def test_marker_only_when_fit_reached_max_steps(tmp_path, rank0, status, step, written):
    from lightning.pytorch.trainer.states import TrainerStatus

    log = tmp_path / "logs" / "version_0"
    log.mkdir(parents=True)
    log.joinpath("metrics.csv").write_text("rl_step,train/entropy,val/acc\n1,2.0,\n2,1.5,nan\n")
    trainer = SimpleNamespace(
        is_global_zero=rank0,
        state=SimpleNamespace(status=TrainerStatus(status)),
        global_step=step,
        max_steps=4,
        lightning_module=SimpleNamespace(updates_per_step=2),  # 2 optimizer steps per RL step
    )
    path = mark_finished(tmp_path, trainer)
    assert (path is not None) == written == (tmp_path / "done.json").is_file()
    assert not list(tmp_path.glob(".done.json*"))  # the temp file was renamed, not left behind
    if written:
        assert json.loads(path.read_text())["metrics"] == {"train/entropy": 1.5, "val/acc": None}
        marker = read_marker(tmp_path)
        assert marker["rl_steps"] == 2 and math.isnan(marker["metrics"]["val/acc"])

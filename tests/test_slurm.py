"""Sweeps on a real Slurm cluster through submitit (CI starts one with scripts/start_slurm.sh).

Skipped, with the reason, where no cluster answers: no sbatch/sinfo, no idle node, or the start script
failed (CI passes its last line in LIGHTNING_ENTROPY_SLURM_ERROR).
"""

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_entropy.completion import read_marker
from lightning_entropy.config import ConfigError
from lightning_entropy.sweep import run_sweep

from .conftest import TINY


def _slurm_unavailable() -> str | None:
    """Why the Slurm tests cannot run here, or None when a node is ready for jobs."""
    start_error = os.environ.get("LIGHTNING_ENTROPY_SLURM_ERROR")
    if start_error:
        return f"scripts/start_slurm.sh failed: {start_error}"
    missing = [tool for tool in ("sbatch", "sinfo", "squeue", "scancel") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (start a cluster with scripts/start_slurm.sh)"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install 'lightning_entropy[slurm]')"
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        ).stdout.split()
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20s (is slurmctld running?)"
    # a busy node (allocated, mixed, completing) still takes jobs: they queue; down or drained ones do not
    if not {"idle", "mix", "alloc", "comp"} & set(states):
        return f"sinfo shows no node that takes jobs (states: {states or 'none'})"
    return None


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(reason := _slurm_unavailable()), reason=reason or ""),
]


def slurm_sweep(tmp_path: Path, grid: str, extra: tuple[str, ...] = (), name: str = "tiny") -> Path:
    overrides = ", ".join(f"'{o}'" for o in [*TINY, *extra])
    f = tmp_path / "grid.yaml"
    f.write_text(
        f"name: {name}\noverrides: [{overrides}]\ngrid:\n{grid}\n"
        "launcher: slurm\nslurm: {cpus_per_task: 1, timeout_min: 20}\n"
    )
    return f


def test_slurm_sweep_runs_both_runs(tmp_path, tiny_cache):
    f = slurm_sweep(tmp_path, "  advantage.name: [grpo, rloo]", ("trainer.max_steps=2",))
    out = tmp_path / "out" / "tiny"
    assert run_sweep(f, root=str(tmp_path / "out")) == 0
    assert all(read_marker(out / name)["rl_steps"] == 2 for name in ("grpo", "rloo"))
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["run"], r["status"]) for r in rows] == [("grpo", "finished"), ("rloo", "finished")]
    # both ran as Slurm jobs: submitit keeps one stdout per job id
    assert len(list((out / "slurm").glob("*_log.out"))) == 2


def test_scancel_one_job_then_relaunch_resumes_only_it(tmp_path, tiny_cache):
    # one short and one long run, so the long one is surely mid-way when it is cancelled (within a
    # second of its first checkpoint; 15 steps take 15 s or more)
    f = slurm_sweep(tmp_path, "  trainer.max_steps: [2, 16]", ("logging.ckpt_every=1", "logging.val_every=5"))
    out = tmp_path / "out" / "tiny"
    cmd = [sys.executable, "-m", "lightning_entropy", "sweep", str(f), "--root", str(tmp_path / "out")]
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    long_run = out / "max_steps16"
    deadline = time.time() + 300
    while not (long_run / "checkpoints" / "optstep1.ckpt").is_file():
        assert sweep.poll() is None, sweep.stdout.read()
        assert time.time() < deadline, "the long run wrote no checkpoint within 300s"
        time.sleep(0.5)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    job_id = next(line.split()[0] for line in jobs.splitlines() if line.split()[1] == "tiny:max_steps16")
    subprocess.run(["scancel", job_id], check=True)
    log, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 1, log
    assert "did not finish" in log and "max_steps16" in log.splitlines()[-1]
    assert read_marker(long_run) is None and (long_run / "checkpoints" / "last.ckpt").is_file()
    assert read_marker(out / "max_steps2")["rl_steps"] == 2
    rows = {r["run"]: r["status"] for r in csv.DictReader(open(out / "results.csv"))}
    assert rows == {"max_steps2": "finished", "max_steps16": "unfinished"}

    short_done = (out / "max_steps2" / "done.json").stat().st_mtime_ns
    relaunch = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    assert "1 finished, 1 resume" in relaunch.stdout
    assert relaunch.stdout.count("submitted ") == 1 and "submitted max_steps16" in relaunch.stdout
    assert (out / "max_steps2" / "done.json").stat().st_mtime_ns == short_done
    assert len(list(long_run.glob("config.resume-*.yaml"))) == 1
    assert read_marker(long_run)["rl_steps"] == 16
    rows = {r["run"]: r["status"] for r in csv.DictReader(open(out / "results.csv"))}
    assert rows == {"max_steps2": "finished", "max_steps16": "finished"}


def test_srun_launches_one_ddp_rank_per_task(tmp_path, tiny_cache):
    # the single-node case of multi-node launching: srun starts 2 tasks, Lightning's SLURMEnvironment
    # makes them the 2 DDP ranks; only global rank 0 may create the run directory and the marker
    f = tmp_path / "grid.yaml"
    overrides = ", ".join(
        f"'{o}'" for o in [*TINY, "trainer.max_steps=2", "trainer.devices=2", "trainer.strategy=ddp"]
    )
    f.write_text(
        f"name: tiny\noverrides: [{overrides}]\ngrid:\n  advantage.name: [grpo]\nlauncher: slurm\n"
        "slurm: {nodes: 1, tasks_per_node: 2, cpus_per_task: 1, timeout_min: 10}\n"
    )
    out = tmp_path / "out" / "tiny"
    assert run_sweep(f, root=str(tmp_path / "out")) == 0
    assert read_marker(out / "grpo")["rl_steps"] == 2
    logs = sorted((out / "slurm").glob("*_log.err"))
    assert len(logs) == 2  # one per srun task
    ranks = {
        line.split("GLOBAL_RANK: ")[1].split(",")[0]
        for p in logs
        for line in p.read_text().splitlines()
        if "GLOBAL_RANK: " in line
    }
    assert ranks == {"0", "1"}


def test_relaunch_refuses_a_run_whose_job_is_still_active(tmp_path):
    # a job named like the sweep's run (<sweep>:<run>) stands for one left running by the last launch;
    # the sweep has a name of its own, so jobs of the other tests (still completing) cannot match
    f = slurm_sweep(tmp_path, "  advantage.name: [grpo]", ("trainer.max_steps=2",), name="held")
    job = subprocess.run(
        ["sbatch", "--parsable", "-J", "held:grpo", "-o", "/dev/null", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        with pytest.raises(ConfigError, match=f"run 'grpo' is still queued or running as Slurm job {job};"):
            run_sweep(f, root=str(tmp_path / "out"))
        assert not (tmp_path / "out" / "held" / "grpo").exists()  # nothing was started
    finally:
        subprocess.run(["scancel", job], check=True)

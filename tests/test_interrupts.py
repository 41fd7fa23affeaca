"""Interrupts (issue 12 item 3): SIGINT / SIGTERM / Slurm's requeue signal arriving in the middle of
an RL step save that step's checkpoint and stop cleanly; resuming continues exactly.

The signal is sent by the run to itself from inside a reward call (tests/_signal_reward.py), so it
lands mid-step at a known step without timing races."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_entropy import checkpointing
from lightning_entropy.__main__ import main
from lightning_entropy.report import read_metrics

from .conftest import TINY

PLUGIN = str(Path(__file__).with_name("_signal_reward.py"))
COMMON = ["--import", PLUGIN, *TINY, "reward.name=signal_at_step", "logging.ckpt_every=100"]


def _cli(root: Path, name: str | None, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    named = [f"logging.name={name}"] if name else []
    cmd = [sys.executable, "-m", "lightning_entropy", "fit", *COMMON, f"logging.root={root}", *named, *extra]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    return subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=900)


def _rl_step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["lightning_entropy"]["rl_step"]


def test_sigterm_mid_step_saves_that_step_exits_cleanly_and_resume_is_exact(tmp_path, tiny_cache):
    out = _cli(
        tmp_path, "killed", "trainer.max_steps=4", env={"LE_TEST_SIGNAL": "SIGTERM", "LE_TEST_SIGNAL_AT": "3"}
    )
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "Stopped by SIGTERM after RL step 3" in out.stderr
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # no temp files, no optstep
    assert _rl_step(ckpt_dir / "last.ckpt") == 3  # the step during which the signal came is kept

    assert main(["fit", "--resume", str(ckpt_dir / "last.ckpt"), "trainer.max_steps=4"]) == 0
    args = ["fit", *COMMON, f"logging.root={tmp_path}", "logging.name=straight", "trainer.max_steps=4"]
    assert main(args) == 0
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert a["lightning_entropy"]["rl_step"] == b["lightning_entropy"]["rl_step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(
        b["optimizer_states"][0]["state"][0]["exp_avg"]
    )
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # never last-v1.ckpt
    assert (
        read_metrics(tmp_path / "straight")["train/reward"][-1]
        == read_metrics(tmp_path / "killed")["train/reward"][-1]
    )


def test_sigint_saves_through_the_atomic_writer_and_restores_the_handler(
    tmp_path, tiny_cache, monkeypatch, capsys
):
    saved = []
    real = checkpointing.atomic_save
    monkeypatch.setattr(
        checkpointing, "atomic_save", lambda obj, path: saved.append(Path(path)) or real(obj, path)
    )
    monkeypatch.setenv("LE_TEST_SIGNAL", "SIGINT")
    monkeypatch.setenv("LE_TEST_SIGNAL_AT", "2")
    before = signal.getsignal(signal.SIGINT)
    args = ["fit", *COMMON, f"logging.root={tmp_path}", "logging.name=ctrlc", "trainer.max_steps=5"]
    assert main([*args, "logging.ckpt_every=2"]) == 128 + signal.SIGINT
    last = tmp_path / "ctrlc" / "checkpoints" / "last.ckpt"
    # the regular checkpoint due at the stopping step is still written; each file once, atomically
    assert saved == [last.with_name("optstep2.ckpt"), last]
    assert _rl_step(last) == 2
    assert "Stopped by SIGINT after RL step 2" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path, tiny_cache, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "le-test",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = _cli(
        runs, None, "trainer.max_steps=3", env={**env, "LE_TEST_SIGNAL": "SIGUSR1", "LE_TEST_SIGNAL_AT": "2"}
    )
    assert out.returncode == 128 + signal.SIGUSR1, out.stderr[-3000:]
    assert "Slurm job requeued" in out.stderr
    assert log.read_text().split() == ["requeue", "4242"]
    run = runs / "fit-slurm4242"  # an unnamed Slurm run is named by its job id, so the requeue finds it
    assert _rl_step(run / "checkpoints" / "last.ckpt") == 2
    assert not list(run.glob("hpc_ckpt_*.ckpt"))  # Lightning's mid-step save did not run

    # Slurm reruns the same command with SLURM_RESTART_COUNT set
    for k, v in {**env, "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LIGHTNING_ENTROPY_RUN_NAME", raising=False)
    monkeypatch.chdir(runs)
    assert main(["fit", *COMMON, f"logging.root={runs}", "trainer.max_steps=3"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["fit-slurm4242"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert _rl_step(run / "checkpoints" / "last.ckpt") == 3

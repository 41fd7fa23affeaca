"""Checkpoints on disk (issue 12 items 2 and 5): atomic writes under fault injection, and the checks
``--resume`` runs before anything is built or written."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_entropy import checkpointing
from lightning_entropy.__main__ import main
from lightning_entropy.checkpointing import AtomicCheckpointIO, atomic_save, remove_stale_temps

from .conftest import TINY


def _temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if checkpointing.TEMP_RE.match(p.name)]


# ---- atomic writes ---------------------------------------------------------------------------------


def test_save_goes_through_a_temp_file_in_the_same_directory_fsynced_before_the_replace(
    tmp_path, monkeypatch
):
    events = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(checkpointing.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))

    def replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", replace)
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)
    moves = [e for e in events if isinstance(e, tuple)]
    assert len(moves) == 1
    _, src, dst = moves[0]
    assert dst == target and src.parent == target.parent  # never through $TMPDIR
    assert events.index("fsync") < events.index(moves[0])  # data on disk before the name points at it
    assert torch.load(target, weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]
    assert _temps(target.parent) == []


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("injected failure in the middle of torch.save")


def test_exception_mid_write_leaves_last_loadable_and_no_temp_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.zeros(4)}, target)
    # tensors first, then an object whose pickling fails: the write dies part-way through
    with pytest.raises(RuntimeError, match="injected"):
        atomic_save({"w": torch.ones(100_000), "z": _Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert _temps(tmp_path) == []


def test_failure_at_the_move_leaves_last_loadable_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, target)

    def boom(src, dst):
        raise OSError("injected: killed before the rename")

    monkeypatch.setattr(checkpointing.os, "replace", boom)
    with pytest.raises(OSError, match="injected"):
        atomic_save({"step": 2}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert _temps(tmp_path) == []


WRITER = textwrap.dedent(
    """
    import sys, torch
    from lightning_entropy.checkpointing import atomic_save
    step = 0
    while True:
        step += 1
        atomic_save({"step": step, "w": torch.randn(4_000_000)}, sys.argv[1])  # 16 MB
    """
)


def test_sigkill_during_a_write_leaves_last_loadable_and_the_next_run_removes_the_temp(tmp_path):
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    try:
        deadline = time.time() + 120
        # wait for a completed checkpoint, then for the next write to be under way, and kill it there
        while not target.exists() and time.time() < deadline:
            time.sleep(0.01)
        while not _temps(tmp_path) and time.time() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert torch.load(target, weights_only=True)["step"] >= 1
    stale = _temps(tmp_path)
    assert stale, "the kill did not land during a write"
    assert remove_stale_temps(tmp_path) == stale  # what the next fit in this run directory does first
    assert _temps(tmp_path) == []


# ---- resume ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_cache):
    root = tmp_path_factory.mktemp("runs")
    args = ["fit", *TINY, f"logging.root={root}", "logging.name=base", "trainer.max_steps=2"]
    assert main([*args, "logging.ckpt_every=1"]) == 0
    return root / "base"


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_resume_of_an_older_checkpoint_is_refused_without_fork(base_run, capsys):
    before = _listing(base_run)
    rc = main(["fit", "--resume", str(base_run / "checkpoints" / "optstep1.ckpt"), "trainer.max_steps=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "older checkpoint (RL step 1)" in err and "continued to RL step 2" in err and "--fork" in err
    assert _listing(base_run) == before  # no config.resume-*.yaml, no last-v1.ckpt


def test_fork_continues_an_older_checkpoint_in_a_new_directory_exactly(base_run, capsys):
    before = _listing(base_run)
    older = base_run / "checkpoints" / "optstep1.ckpt"
    assert main(["fit", "--resume", str(older), "--fork", "trainer.max_steps=2"]) == 0
    fork = base_run.parent / "base-fork1"
    assert _listing(base_run) == before  # the original branch is untouched
    assert sorted(p.name for p in (fork / "checkpoints").iterdir()) == ["last.ckpt", "optstep2.ckpt"]
    assert (fork / "forked_from.txt").read_text().strip() == str(older.resolve())
    assert "name: base-fork1" in (fork / "config.yaml").read_text()
    a = torch.load(base_run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(fork / "checkpoints" / "last.ckpt", weights_only=True)
    assert b["lightning_entropy"]["rl_step"] == 2
    for k, v in a["state_dict"].items():  # the fork replays step 2 exactly as the original did
        assert torch.equal(v, b["state_dict"][k]), k
    # a second fork of the same checkpoint gets its own directory
    assert main(["fit", "--resume", str(older), "--fork", "trainer.max_steps=2"]) == 0
    assert (base_run.parent / "base-fork1-2" / "checkpoints" / "last.ckpt").is_file()
    # --fork of the head itself is a mistake worth saying
    capsys.readouterr()
    assert main(["fit", "--resume", str(base_run / "checkpoints" / "last.ckpt"), "--fork"]) == 2
    assert "head of its run" in capsys.readouterr().err


def test_resume_with_another_model_shape_says_what_differs_before_building_it(base_run, tiny_cache, capsys):
    before, cache = _listing(base_run), _listing(tiny_cache)
    last = str(base_run / "checkpoints" / "last.ckpt")
    rc = main(["fit", "--resume", last, "model.tiny.hidden_size=64", "model.tiny.num_layers=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "model.tiny.hidden_size: checkpoint 32, now 64" in err
    assert "model.tiny.num_layers: checkpoint 2, now 3" in err
    assert _listing(base_run) == before
    assert _listing(tiny_cache) == cache  # no new tiny policy was built for the comparison


@pytest.mark.parametrize("kind", ["truncated", "foreign", "other_lightning"])
def test_unreadable_or_foreign_checkpoint_is_one_line_and_writes_nothing(base_run, tmp_path, kind, capsys):
    run = tmp_path / "copy"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((base_run / "config.yaml").read_text())
    bad = run / "checkpoints" / "bad.ckpt"
    data = (base_run / "checkpoints" / "last.ckpt").read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        bad.write_text("not a checkpoint\n")
    else:
        torch.save({"state_dict": {}, "global_step": 3}, bad)  # some other Lightning project's file
    before = _listing(run)
    for command in ("fit", "validate"):
        assert main([command, "--resume", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err, err
        assert (
            "not a lightning_entropy checkpoint" if kind == "other_lightning" else "not a readable"
        ) in err
    assert _listing(run) == before  # no config.resume-*.yaml


def test_resume_of_a_checkpoint_without_last_is_allowed_only_from_the_newest(base_run, tmp_path, capsys):
    """A run killed before its first last.ckpt: its newest optstep is the head."""
    run = tmp_path / "nolast"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((base_run / "config.yaml").read_text().replace("base", "nolast"))
    for name in ("optstep1.ckpt", "optstep2.ckpt"):
        (run / "checkpoints" / name).write_bytes((base_run / "checkpoints" / name).read_bytes())
    assert main(["fit", "--resume", str(run / "checkpoints" / "optstep1.ckpt")]) == 2
    assert "newer checkpoints exist" in capsys.readouterr().err
    assert main(["fit", "--resume", str(run / "checkpoints" / "optstep2.ckpt"), "trainer.max_steps=3"]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "optstep1.ckpt", "optstep2.ckpt", "optstep3.ckpt"]


def test_fork_directory_is_named_once_and_shared_with_ddp_ranks(base_run, monkeypatch):
    """Lightning relaunches the command for ranks 1..N after rank 0 made the fork directory: they must
    join it, not pick the next free name."""
    from lightning_entropy.__main__ import RUN_NAME_ENV, resolve_run

    older = str(base_run / "checkpoints" / "optstep1.ckpt")

    def args():
        return type(
            "Args",
            (),
            {"resume": older, "fork": True, "config": None, "imports": [], "overrides": [], "command": "fit"},
        )

    monkeypatch.delenv(RUN_NAME_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    _, rank0_dir, _ = resolve_run(args())
    rank0_dir.mkdir()  # what rank 0 does next
    monkeypatch.setenv("RANK", "1")
    _, rank1_dir, _ = resolve_run(args())
    assert rank1_dir == rank0_dir and os.environ[RUN_NAME_ENV] == rank0_dir.name

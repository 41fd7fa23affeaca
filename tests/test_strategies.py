"""Sharded and multi-rank training (issues 15 and 17): FSDP2 on 2 gloo CPU ranks gives the update of
one rank, generates on the sharded policy, resumes exactly after a kill and exports to a 1-device
Hugging Face folder; each rank samples from its own stream and resumes it bit for bit.

The 2-rank fits run through the real CLI in a subprocess (Lightning relaunches it once per rank);
the kill comes from inside the run (tests/_recording_sampler.py), so it lands mid-step at a known step.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_entropy.__main__ import main
from lightning_entropy.config import load_config
from lightning_entropy.metrics import MetricBank
from lightning_entropy.models import build_char_tokenizer, build_tiny_model
from lightning_entropy.preflight import check_trainer
from lightning_entropy.report import read_metrics
from lightning_entropy.rng import rank_seed
from lightning_entropy.strategies import gathered_for_generation, shard_model
from lightning_entropy.update import build_optimizer
from tests._dist import run_two_ranks
from tests.test_module import make_module, make_rollout

from .conftest import TINY

PLUGIN = str(Path(__file__).with_name("_recording_sampler.py"))
UPDATE = ["algo.mini_batch_size=8", "optim.lr=1e-2"]  # two optimizer steps per rollout; visible moves
PROMPTS = ["12+34=r", "5+77=r", "60+21=r", "9+9=r"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    tok = build_char_tokenizer()
    build_tiny_model(
        len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64, seed=0
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _update(m, batch):
    """One RL step's update (two mini-batches: the second is off-policy) with a real optimizer."""
    opt, sched = build_optimizer([p for p in m.policy.parameters()], m.cfg.optim, 10)
    m.update_stage.run(
        batch, 0, m.rollout_size, m.policy, opt, sched, lambda loss: loss.backward(), MetricBank()
    )


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _rank_rows(rank, world, n, mini=8):
    """This rank's rows such that each global mini-batch holds the rows the single rank's holds:
    rank r takes its 1/world share of every mini-batch (whole groups of 4)."""
    share = mini // world
    return torch.cat([torch.arange(i + rank * share, i + (rank + 1) * share) for i in range(0, n, mini)])


def _fsdp2_worker(rank, world, port, path, batch, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = make_module(path, *UPDATE)
        shard_model(m.policy, init_device_mesh("cpu", (world,)))
        assert all(isinstance(p, DTensor) for p in m.policy.parameters())
        sampler = m.components["sampler"]
        # generation on the sharded policy, ranks decoding different prompts to different lengths
        with gathered_for_generation(m.policy):
            greedy = sampler.generate(m.policy, m.tokenizer, PROMPTS, 1, temperature=0.0)
            torch.manual_seed(rank)
            sampler.generate(m.policy, m.tokenizer, PROMPTS[rank:], 2, max_new_tokens=3 + 4 * rank)
        assert all(isinstance(p, DTensor) for p in m.policy.parameters())  # sharded again
        _update(m, batch.index(_rank_rows(rank, world, batch.size)))
        params = {n: _full(p) for n, p in m.policy.named_parameters()}
        if rank == 0:
            torch.save({"greedy": greedy.response_ids, "params": params}, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_give_the_update_of_one_and_generate_on_the_sharded_policy(policy_dir, tmp_path):
    single = make_module(policy_dir, *UPDATE)
    batch = make_rollout(single)
    greedy = single.components["sampler"].generate(
        single.policy, single.tokenizer, PROMPTS, 1, temperature=0.0
    )
    before = {n: p.detach().clone() for n, p in single.policy.named_parameters()}
    _update(single, batch)
    out = tmp_path / "fsdp2.pt"
    run_two_ranks(_fsdp2_worker, policy_dir, batch, str(out), timeout=300)
    got = torch.load(out)
    assert torch.equal(got["greedy"], greedy.response_ids)
    moved = 0
    for n, p in single.policy.named_parameters():
        assert torch.allclose(got["params"][n], p, atol=1e-5, rtol=0), n
        moved += int((p - before[n]).abs().max() > 1e-3)
    assert moved > len(before) // 2, "the update barely moved the policy: the comparison would be vacuous"


# ---- the CLI on 2 ranks ------------------------------------------------------------------------------

FIT = [
    "--import",
    PLUGIN,
    *TINY,
    "sampler.name=hf_recorded",
    "sampler.max_new_tokens=8",
    "trainer.devices=2",
    "trainer.max_steps=4",
    "algo.mini_batch_size=8",
    "optim.schedule=constant",
    "logging.val_samples=2",
    "logging.pass_k=[1,2]",
]


def _fit(root, name, record, *extra, env=None, resume=None):
    record.mkdir(parents=True, exist_ok=True)
    head = ["--resume", str(resume)] if resume else [*FIT, f"logging.root={root}", f"logging.name={name}"]
    cmd = [sys.executable, "-m", "lightning_entropy", "fit", *head, *extra]
    full = {**os.environ, "LE_TEST_RECORD": str(record), "OMP_NUM_THREADS": "1", **(env or {})}
    full.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    return subprocess.run(cmd, cwd=root, env=full, capture_output=True, text=True, timeout=900)


def _records(record: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]


# fsdp2: last.ckpt is due at step 3 only; the run's end must write the final step (final/ comes from it)
@pytest.mark.parametrize("strategy,ckpt_every", [("ddp", 1), ("fsdp2", 3)], ids=["ddp", "fsdp2"])
def test_two_rank_kill_and_resume_is_bit_exact_with_per_rank_streams(
    tmp_path, tiny_cache, strategy, ckpt_every
):
    run = [f"trainer.strategy={strategy}", f"logging.ckpt_every={ckpt_every}"]
    straight = _fit(tmp_path, "straight", tmp_path / "rec_straight", *run)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _fit(
        tmp_path, "killed", tmp_path / "rec_killed", *run,
        env={"LE_TEST_SIGNAL": "SIGTERM", "LE_TEST_SIGNAL_AT": "2"},
    )  # fmt: skip
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["lightning_entropy"]
    assert saved["rl_step"] == 2 and len(saved["rng_by_rank"]) == 2
    resumed = _fit(tmp_path, None, tmp_path / "rec_killed", resume=last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    rec = {r: (_records(tmp_path / "rec_straight", r), _records(tmp_path / "rec_killed", r)) for r in (0, 1)}
    for r, (a, b) in rec.items():
        assert len(a) == len(b) == 4, r
        assert a == b, f"rank {r}: the resumed run sampled other responses"
    # the ranks' streams differ, and so do their rollouts' lengths (what made one shared state inexact)
    assert rec[0][0] != rec[1][0]
    widths = [[len(call["ids"][0]) for call in rec[r][0]] for r in (0, 1)]
    lengths = [[sum(map(sum, call["mask"])) for call in rec[r][0]] for r in (0, 1)]
    assert widths[0] != widths[1] or lengths[0] != lengths[1], (widths, lengths)

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["lightning_entropy"]["rl_step"] == b["lightning_entropy"]["rl_step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for i, state in a["optimizer_states"][0]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer_states"][0]["state"][i]["exp_avg"]), i
    sa, sb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    for key in ("train/reward", "train/entropy", "train/pg_loss", "val/acc"):
        assert sa[key] == sb[key], key
    if strategy == "fsdp2":
        _check_fsdp2_outputs(tmp_path / "straight", a)


def _check_fsdp2_outputs(run: Path, ckpt: dict) -> None:
    """A sharded run's full-state checkpoint: final/ and `export` load as 1-device HF models with its
    weights, and the checkpoint loads into a 1-device run."""
    from transformers import AutoModelForCausalLM

    assert main(["export", str(run), str(run.parent / "exported")]) == 0
    policy = {k[len("policy.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    for folder in (run / "final", run.parent / "exported"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        for k, v in model.state_dict().items():
            assert torch.equal(v, policy[k]), (folder, k)
    last = str(run / "checkpoints" / "last.ckpt")
    assert main(["validate", "--resume", last, "trainer.devices=1", "trainer.strategy=auto"]) == 0


# ---- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload", "deepspeed_stage_3"])
def test_gpu_only_strategies_on_cpu_fail_in_one_line_naming_the_key(tmp_path, strategy, capsys):
    args = [
        "fit",
        *TINY,
        f"logging.root={tmp_path}",
        "trainer.accelerator=cpu",
        f"trainer.strategy={strategy}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: trainer.strategy={strategy}:") and len(err.splitlines()) == 1
    assert "fsdp2" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_fsdp2_is_a_valid_strategy_string():
    check_trainer(load_config(None, ["trainer.strategy=fsdp2", "trainer.devices=2"]))


def test_rank_streams_rank_zero_keeps_the_seed_and_others_differ():
    assert rank_seed(1234, 0) == 1234
    seeds = {rank_seed(s, r) for s in (0, 1, 1234) for r in range(1, 8)}
    assert len(seeds) == 21 and not seeds & {0, 1, 1234}
    assert rank_seed(1234, 3) == rank_seed(1234, 3)  # a function of (seed, rank) alone

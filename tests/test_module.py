"""The update loop without a Trainer: micro-batching and data parallelism must not change gradients."""

import pytest
import torch
import torch.distributed as dist

from lightning_entropy.components.losses import kl_penalty
from lightning_entropy.config import load_config
from lightning_entropy.metrics import MetricBank
from lightning_entropy.models import build_char_tokenizer, build_tiny_model
from lightning_entropy.module import RLVRModule
from tests._dist import run_two_ranks


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    tok = build_char_tokenizer()
    build_tiny_model(
        len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64, seed=0
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_module(policy_dir, *overrides):
    cfg = load_config(
        None, ["sampler.group_size=4", "data.prompts_per_step=4", "sampler.max_new_tokens=6", *overrides]
    )
    m = RLVRModule(cfg, policy_dir)
    m.configure_model()
    return m


def make_rollout(m, seed=0):
    torch.manual_seed(seed)
    prompts = ["12+34=r", "5+77=r", "60+21=r", "9+9=r"]
    batch = m.components["sampler"].generate(m.policy, m.tokenizer, prompts, m.group_size)
    g = torch.Generator().manual_seed(seed)
    batch.rewards = torch.randint(0, 2, (batch.size,), generator=g).float()
    old_policy_pass(m, batch)
    batch.advantages = m.components["advantage"](batch) * batch.response_mask
    return batch


def old_policy_pass(m, batch):
    m.forward_cfg.old_policy_pass(m.policy, batch, ref_policy=m.ref_policy)


def grads_for(m, batch, stats=None):
    m.policy.zero_grad()
    bank = MetricBank()
    m.update_stage.accumulate_gradients(m.policy, batch, 0, lambda loss: loss.backward(), bank)
    m.update_stage.record_selection(batch, bank)
    if stats is not None:
        stats.update({k: float(v) for k, v in bank.compute().items()})
    return {n: p.grad.clone() for n, p in m.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize(
    "extra", [[], ["regularizer.name=entropy_bonus", "regularizer.coef=0.01"], ["algo.kl_coef=0.1"]]
)
def test_micro_batches_do_not_change_the_gradient(policy_dir, agg, extra):
    whole = make_module(policy_dir, f"loss.agg={agg}", *extra)
    batch = make_rollout(whole)
    # perturb so the ratio is not 1 and clipping is exercised
    batch.old_logprobs = batch.old_logprobs + 0.3 * torch.randn_like(batch.old_logprobs) * batch.response_mask
    s_whole, s_micro = {}, {}
    g_whole = grads_for(whole, batch, s_whole)
    micro = make_module(policy_dir, f"loss.agg={agg}", "algo.micro_batch_size=3", *extra)
    g_micro = grads_for(micro, batch, s_micro)
    # logged statistics are pooled as [sum, count]: the split changes neither the loss nor the fractions
    assert s_whole.keys() == s_micro.keys() and "loss/clip_low_frac" in s_whole
    for k, v in s_whole.items():
        assert s_micro[k] == pytest.approx(v, abs=1e-6), k
    assert g_whole.keys() == g_micro.keys() and g_whole
    for k in g_whole:
        assert torch.allclose(g_whole[k], g_micro[k], atol=1e-5, rtol=1e-4), k


def test_old_policy_pass_matches_naive_log_softmax(policy_dir):
    m = make_module(policy_dir, "sampler.temperature=0.7")
    batch = make_rollout(m)
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = m.policy(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + T] / 0.7, -1)
    ref = logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * batch.response_mask
    ent = -(logp.exp() * logp).sum(-1) * batch.response_mask
    assert torch.allclose(batch.old_logprobs, ref, atol=1e-5)
    assert torch.allclose(batch.entropy, ent, atol=1e-4)


def test_old_policy_pass_fills_clip_v_baseline_only_when_asked(policy_dir):
    m = make_module(policy_dir, "sampler.temperature=0.7", "selector.name=clip_v")
    batch = make_rollout(m)
    assert batch.discriminator_baseline is None and batch.self_certainty is None  # not asked
    m.forward_cfg.old_policy_pass(m.policy, batch, extras=frozenset({"discriminator_baseline"}))
    assert batch.self_certainty is None
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = m.policy(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    p = torch.softmax(logits[:, P - 1 : P - 1 + T].double() / 0.7, -1)
    h = -(p * p.log()).sum(-1)
    n = (h * (p**2).sum(-1) + (p**2 * p.log()).sum(-1)) * batch.response_mask
    assert torch.allclose(batch.discriminator_baseline.double(), n, atol=1e-5)
    assert m.rollout_stage.needs == {"discriminator_baseline"}  # the rollout stage asks for it


@pytest.mark.parametrize("topk", [None, 3])
def test_era_old_pass_and_update_forward_share_the_logit_transform(policy_dir, topk):
    """Through the real rollout stage: pi_old under z' = s z (s = k on A > 0 tokens of sharpened
    responses) equals the update's forward under the same transform, and both are log_softmax(s z / T)
    (over the top-k logits renormalised, -1e4 outside, with ``topk``)."""
    from types import SimpleNamespace

    from lightning_entropy.metrics import PhaseTimer

    # omega_low above any entropy: every response is "low entropy", so every A > 0 token is sharpened
    m = make_module(
        policy_dir, "sampler.temperature=0.7", "loss.name=era", "loss.omega_low=50.0", "loss.omega_high=60.0",
        f"loss.topk={'null' if topk is None else topk}",
    )  # fmt: skip
    torch.manual_seed(0)
    examples = [SimpleNamespace(prompt=p, answer=a) for p, a in (("12+34=r", "64"), ("5+77=r", "28"))]
    examples *= 2
    batch = m.rollout_stage(m.policy, None, examples, 0, PhaseTimer())
    assert batch.logit_scale is not None and batch.scaled_old_logprobs.shape == (
        *batch.response_mask.shape,
        2,
    )
    # the same rollout with advantages of both signs (the tiny policy's rewards may all be equal)
    m.forward_cfg.old_policy_pass(m.policy, batch, logit_scales=m.components["loss"].logit_scales)
    plain = batch.old_logprobs.clone()
    batch.advantages = (
        torch.where(torch.arange(batch.size)[:, None] % 2 == 0, 1.0, -1.0) * batch.response_mask
    )
    m.components["loss"].prepare_rollout(batch)
    pos = (batch.advantages > 0) & batch.response_mask.bool()
    assert torch.equal(batch.logit_scale, torch.where(pos, 2.0, 1.0)) and pos.any()
    with torch.no_grad():
        m.policy.eval()
        _, cur, _ = m.forward_cfg.logprobs_entropy(m.policy, batch)
    assert torch.allclose(cur * batch.response_mask, batch.old_logprobs, atol=1e-5)  # ratio 1
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    with torch.no_grad():
        logits = m.policy(
            input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp_min(0)
        ).logits
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    z = logits[:, P - 1 : P - 1 + T] * batch.logit_scale[..., None] / 0.7
    if topk is not None:  # renormalise over the k largest logits; the others get -1e4
        kth = z.topk(topk, -1).values[..., -1:]
        z = torch.where(z >= kth, z, torch.full_like(z, -float("inf")))
    ref = torch.log_softmax(z, -1).gather(-1, batch.response_ids[..., None]).squeeze(-1).clamp_min(-1e4)
    assert torch.allclose(batch.old_logprobs, ref * batch.response_mask, atol=1e-5)
    if topk is not None:
        assert (batch.old_logprobs == -1e4).any()  # some sampled tokens fall outside the top 3
    assert not torch.allclose(batch.old_logprobs[pos], plain[pos], atol=1e-3)  # the transform bites


@pytest.mark.parametrize("final_norm", [False, True])
def test_bupo_layer_policy_is_the_lm_head_on_layer_k_and_trains_only_layers_up_to_k(policy_dir, final_norm):
    from types import SimpleNamespace

    from lightning_entropy.batch import PolicyView
    from lightning_entropy.metrics import PhaseTimer

    m = make_module(policy_dir, "sampler.temperature=0.7", "loss.name=bupo", "loss.layer=0",
                    "loss.bottom_up_steps=1", f"loss.final_norm={str(final_norm).lower()}")  # fmt: skip
    torch.manual_seed(0)
    examples = [SimpleNamespace(prompt=p, answer="1") for p in ("12+34=r", "5+77=r", "60+21=r", "9+9=r")]
    batch = m.rollout_stage(m.policy, None, examples, 0, PhaseTimer())
    assert batch.policy_view == PolicyView(layer=0, final_norm=final_norm)
    # the reference: HF's hidden state after decoder layer 0 (hidden_states[1]), the tied LM head, / T
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = m.policy(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    h1 = out.hidden_states[1][:, P - 1 : P - 1 + T]
    if final_norm:
        h1 = m.policy.get_decoder().norm(h1)
    with torch.no_grad():
        z = m.policy.get_output_embeddings()(h1) / 0.7
    ref = torch.log_softmax(z, -1).gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
    assert torch.allclose(batch.old_logprobs, ref, atol=1e-5)
    full = torch.log_softmax(out.logits[:, P - 1 : P - 1 + T] / 0.7, -1)
    full = full.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
    assert not torch.allclose(batch.old_logprobs, full, atol=1e-3)
    # gradients of the layer policy reach layer 0, the embeddings / head, and nothing above layer 0
    m.policy.zero_grad(set_to_none=True)
    _, lp, _ = m.forward_cfg.logprobs_entropy(m.policy, batch)
    (lp * batch.response_mask).sum().backward()
    grads = {n: p.grad for n, p in m.policy.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".layers.0." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".layers.1." in n)
    norm_grad = grads["model.norm.weight"]
    assert (norm_grad is not None and norm_grad.abs().sum() > 0) == final_norm
    # after S_iter = 1 step: the full model again
    m.components["loss"].end_step({})
    torch.manual_seed(0)
    batch = m.rollout_stage(m.policy, None, examples, 0, PhaseTimer())
    assert batch.policy_view is None


def test_bupo_layer_outside_the_policy_is_named():
    from lightning_entropy.batch import PolicyView, RolloutBatch
    from lightning_entropy.forward import PolicyForward
    from lightning_entropy.models import build_tiny_model

    model = build_tiny_model(
        20, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8, max_positions=16, seed=0
    )
    one = torch.ones(1, 2, dtype=torch.long)
    b = RolloutBatch(one, one, one, one, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool))
    b.policy_view = PolicyView(layer=5)
    with pytest.raises(ValueError, match=r"loss.layer=5: the policy has 2 decoder layers"):
        PolicyForward().logits(model, b)


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = lp - ref  # [0.5, -1.0]
    assert torch.allclose(kl_penalty(lp, ref, "k1"), d)
    assert torch.allclose(kl_penalty(lp, ref, "k2"), 0.5 * d**2)
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.exp(-d) + d - 1)


def _ddp_worker(rank, world, port, policy_dir, overrides, batch, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = make_module(policy_dir, *overrides)
        half = batch.size // world
        g = grads_for(m, batch.index(slice(rank * half, (rank + 1) * half)))
        for v in g.values():  # what DDP does: average gradients over ranks
            dist.all_reduce(v)
            v /= world
        if rank == 0:
            torch.save(g, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.agg=token-mean"],
        ["loss.agg=seq-mean-token-mean", "advantage.name=rloo"],
        ["loss.agg=token-mean", "selector.name=high_entropy", "loss.name=clip_cov"],
    ],
    ids=["token-mean", "seq-mean", "80-20+clip_cov"],
)
def test_two_ranks_give_the_gradient_of_one(policy_dir, overrides, tmp_path):
    single = make_module(policy_dir, *overrides)
    batch = make_rollout(single)
    batch.old_logprobs = batch.old_logprobs + 0.3 * torch.randn_like(batch.old_logprobs) * batch.response_mask
    expected = grads_for(single, batch)
    out = str(tmp_path / "grads.pt")
    run_two_ranks(_ddp_worker, policy_dir, overrides, batch, out)
    got = torch.load(out)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-5, rtol=1e-4), k


def test_hidden_state_path_gives_the_logits_path_gradient(policy_dir):
    extra = ["regularizer.name=entropy_bonus", "regularizer.coef=0.05", "algo.chunk_size=7"]
    a = make_module(policy_dir, *extra)
    batch = make_rollout(a)
    batch.old_logprobs = batch.old_logprobs + 0.3 * torch.randn_like(batch.old_logprobs) * batch.response_mask
    g_logits = grads_for(a, batch)
    b = make_module(policy_dir, *extra, "algo.logits_from_hidden=true")
    g_hidden = grads_for(b, batch)
    for k in g_logits:
        assert torch.allclose(g_logits[k], g_hidden[k], atol=1e-5, rtol=1e-4), k


def test_updates_move_probability_towards_rewarded_answers(policy_dir):
    """Sign check of the whole update: reward responses that start with '7' and watch their log-prob rise."""
    m = make_module(policy_dir, "optim.lr=3e-3", "sampler.max_new_tokens=3")
    opt = torch.optim.Adam(m.policy.parameters(), lr=3e-3)
    seven = m.tokenizer.convert_tokens_to_ids("7")

    def p_seven():
        with torch.no_grad():
            enc = m.tokenizer(["12+34=r"], return_tensors="pt", add_special_tokens=False)
            return torch.softmax(m.policy(**enc).logits[0, -1], -1)[seven].item()

    before = p_seven()
    torch.manual_seed(0)
    for _ in range(30):
        batch = m.components["sampler"].generate(m.policy, m.tokenizer, ["12+34=r"] * 4, m.group_size)
        batch.rewards = (batch.response_ids[:, 0] == seven).float()
        old_policy_pass(m, batch)
        batch.advantages = m.components["advantage"](batch) * batch.response_mask
        opt.zero_grad()
        m.update_stage.accumulate_gradients(m.policy, batch, 0, lambda loss: loss.backward(), MetricBank())
        opt.step()
    assert p_seven() > 5 * before, (before, p_seven())


def test_gradient_matches_an_independent_ppo_computation(policy_dir):
    m = make_module(policy_dir, "loss.eps_low=0.1", "loss.eps_high=0.1")
    batch = make_rollout(m)
    batch.old_logprobs = batch.old_logprobs + 0.2 * torch.randn_like(batch.old_logprobs) * batch.response_mask
    got = grads_for(m, batch)
    # naive: full log_softmax, PPO clip by hand, token-mean over response tokens
    m.policy.zero_grad()
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    logits = m.policy(
        input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp_min(0)
    ).logits
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + T], -1).gather(-1, batch.response_ids[..., None])[
        ..., 0
    ]
    ratio = torch.exp(logp - batch.old_logprobs)
    adv = batch.advantages
    per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.1))
    per_tok = torch.where(adv < 0, torch.minimum(per_tok, -3.0 * adv), per_tok)
    mask = batch.response_mask.float()
    ((per_tok * mask).sum() / mask.sum()).backward()
    for n, p in m.policy.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n

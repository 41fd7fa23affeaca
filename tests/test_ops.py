import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_entropy import ops
from lightning_entropy.ops import (
    discriminator_baseline,
    logprobs_and_entropy,
    logprobs_and_entropy_from_hidden,
    naive_logprobs_and_entropy,
    self_certainty_and_token_logit,
)


def _case(b=3, t=5, v=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    g_lp, g_h = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    return logits, targets, g_lp, g_h


def _grads(fn, logits, targets, g_lp, g_h, entropy_grad, **kw):
    x = logits.clone().requires_grad_()
    lp, h = fn(x, targets, entropy_grad=entropy_grad, **kw)
    loss = (lp * g_lp).sum() + ((h * g_h).sum() if entropy_grad else 0.0)
    (grad,) = torch.autograd.grad(loss, x)
    return lp.detach(), h.detach(), grad


# ---- hand-computed values ----------------------------------------------------------------------


def test_two_token_distribution_by_hand():
    # logits (0, log 3): p = (1/4, 3/4); at temperature 2 the logits (0, 2 log 3) give the same p
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 2 * math.log(3.0)]]])
    targets = torch.tensor([[0, 1]])
    lp, h = logprobs_and_entropy(logits[:, :1], targets[:, :1])
    lp2, h2 = logprobs_and_entropy(logits[:, 1:], targets[:, 1:], temperature=2.0)
    H = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert lp.item() == pytest.approx(math.log(0.25), abs=1e-6)
    assert lp2.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert h.item() == pytest.approx(H, abs=1e-6) and h2.item() == pytest.approx(H, abs=1e-6)


def test_gradients_by_hand():
    # p = (1/4, 3/4), target 1: d logp/dz = onehot - p = (-1/4, 1/4);
    # dH/dz = -p (log p + H)
    z = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    lp, h = logprobs_and_entropy(z, torch.tensor([[1]]), entropy_grad=True)
    (g_lp,) = torch.autograd.grad(lp.sum(), z, retain_graph=True)
    (g_h,) = torch.autograd.grad(h.sum(), z)
    H = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert torch.allclose(g_lp.flatten(), torch.tensor([-0.25, 0.25]), atol=1e-6)
    expect = [-0.25 * (math.log(0.25) + H), -0.75 * (math.log(0.75) + H)]
    assert torch.allclose(g_h.flatten(), torch.tensor(expect), atol=1e-6)


def test_uniform_distribution_gives_log_v():
    v = 1000
    lp, h = logprobs_and_entropy(
        torch.full((2, 3, v), 4.2), torch.zeros(2, 3, dtype=torch.long), chunk_size=4
    )
    assert torch.allclose(h, torch.full((2, 3), math.log(v)), atol=1e-5)
    assert torch.allclose(lp, torch.full((2, 3), -math.log(v)), atol=1e-5)


# ---- against the naive reference ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])  # 4 does not divide 15 rows; 1024 > 15 rows
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_matches_naive(dtype, temperature, chunk_size, entropy_grad):
    logits, targets, g_lp, g_h = _case(dtype=dtype)
    kw = {"temperature": temperature}
    lp, h, grad = _grads(
        logprobs_and_entropy, logits, targets, g_lp, g_h, entropy_grad, chunk_size=chunk_size, **kw
    )
    lp0, h0, grad0 = _grads(naive_logprobs_and_entropy, logits, targets, g_lp, g_h, entropy_grad, **kw)
    assert lp.dtype == h.dtype == torch.float32 and grad.dtype == dtype
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is returned in the logits' dtype
    assert torch.allclose(grad.float(), grad0.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_per_token_temperature_matches_naive(chunk_size, entropy_grad):
    # ERA's z' = s z at one token is temperature T / s there: one temperature per position
    logits, targets, g_lp, g_h = _case()
    temps = torch.tensor([0.5, 1.0, 2.0])[torch.arange(targets.numel()) % 3].view(targets.shape)
    kw = {"temperature": temps}
    lp, h, grad = _grads(
        logprobs_and_entropy, logits, targets, g_lp, g_h, entropy_grad, chunk_size=chunk_size, **kw
    )
    lp0, h0, grad0 = _grads(naive_logprobs_and_entropy, logits, targets, g_lp, g_h, entropy_grad, **kw)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)
    assert torch.allclose(grad, grad0, atol=1e-5)
    # a constant tensor is the float temperature
    same, _ = logprobs_and_entropy(logits, targets, temperature=torch.full(targets.shape, 0.7))
    assert torch.allclose(same, logprobs_and_entropy(logits, targets, temperature=0.7)[0], atol=1e-6)
    with pytest.raises(ValueError, match="per-token temperature shape"):
        logprobs_and_entropy(logits, targets, temperature=temps[:, :1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprobs_and_entropy(logits, targets, temperature=temps * 0)


def test_matches_float64_reference():
    logits, targets, _, _ = _case(v=50)
    z = logits.double() / 0.8
    ref_lp = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
    ref_h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    lp, h = logprobs_and_entropy(logits, targets, temperature=0.8, chunk_size=2)
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(h.double(), ref_h, atol=1e-5)


def test_sliced_non_contiguous_logits():
    full, targets, g_lp, g_h = _case(t=9, v=23)
    sliced = full[:, 2:-1]  # cannot be viewed as [N, V]: the chunk rows are gathered instead
    assert not sliced.is_contiguous()
    x = full.clone().requires_grad_()
    lp, h = logprobs_and_entropy(x[:, 2:-1], targets[:, 2:-1], chunk_size=5, entropy_grad=True)
    ((lp * g_lp[:, 2:-1]).sum() + (h * g_h[:, 2:-1]).sum()).backward()
    lp0, h0, grad0 = _grads(
        naive_logprobs_and_entropy, sliced.contiguous(), targets[:, 2:-1], g_lp[:, 2:-1], g_h[:, 2:-1], True
    )
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)
    assert torch.allclose(x.grad[:, 2:-1], grad0, atol=1e-5)
    assert x.grad[:, :2].abs().sum() == 0 and x.grad[:, -1:].abs().sum() == 0


def test_peaked_distribution_has_zero_entropy_and_finite_grads():
    v = 64
    logits = torch.full((2, 3, v), -50.0)
    logits[..., 7] = 50.0  # p(7) = 1 up to exp(-100): entropy ~ 0
    logits[1, 2] = torch.full((v,), -1e4)
    logits[1, 2, 3] = 1e4  # every other p underflows to exactly 0 in fp32
    targets = torch.full((2, 3), 7)
    targets[1, 2] = 3
    x = logits.clone().requires_grad_()
    lp, h = logprobs_and_entropy(x, targets, entropy_grad=True, chunk_size=4)
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and torch.isfinite(x.grad).all()
    assert h.abs().max() < 1e-30 + 1e-6 and lp.abs().max() < 1e-6
    assert x.grad.abs().max() < 1e-6  # onehot - p = 0 and p (log p + H) = 0 at a one-hot p


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_masked_vocabulary_minus_inf(entropy_grad):
    logits, targets, g_lp, g_h = _case(v=20)
    targets = targets % 12  # sampled tokens live in the unmasked part
    masked = logits.clone()
    masked[..., 12:] = -math.inf
    lp, h, grad = _grads(logprobs_and_entropy, masked, targets, g_lp, g_h, entropy_grad, chunk_size=4)
    # independent reference: the same distribution over the 12-token vocabulary
    lp0, h0, grad0 = _grads(naive_logprobs_and_entropy, logits[..., :12], targets, g_lp, g_h, entropy_grad)
    assert not (lp.isnan().any() or h.isnan().any() or grad.isnan().any())
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)
    assert torch.allclose(grad[..., :12], grad0, atol=1e-5) and (grad[..., 12:] == 0).all()


def test_entropy_differentiable_only_when_asked():
    logits, targets, _, _ = _case()
    x = logits.clone().requires_grad_()
    lp, h = logprobs_and_entropy(x, targets)
    assert lp.requires_grad and not h.requires_grad
    lp, h = logprobs_and_entropy(x, targets, entropy_grad=True)
    assert lp.requires_grad and h.requires_grad
    lp, h = logprobs_and_entropy(logits, targets, entropy_grad=True)  # logits without grad
    assert not lp.requires_grad and not h.requires_grad


def test_compute_entropy_false():
    logits, targets, g_lp, _ = _case()
    x = logits.clone().requires_grad_()
    lp, h = logprobs_and_entropy(x, targets, compute_entropy=False, chunk_size=4)
    assert h is None
    (lp * g_lp).sum().backward()
    lp0, _, grad0 = _grads(naive_logprobs_and_entropy, logits, targets, g_lp, None, False)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(x.grad, grad0, atol=1e-5)


def test_logprob_gradient_only_with_unused_entropy_gradient():
    # entropy_grad=True but the loss does not touch the entropy: the gradient is the log-prob one
    logits, targets, g_lp, _ = _case()
    x = logits.clone().requires_grad_()
    lp, h = logprobs_and_entropy(x, targets, entropy_grad=True, chunk_size=2)
    (lp * g_lp).sum().backward()
    _, _, grad0 = _grads(naive_logprobs_and_entropy, logits, targets, g_lp, None, False)
    assert torch.allclose(x.grad, grad0, atol=1e-5)


def test_empty_rows():
    x = torch.randn(2, 0, 11, requires_grad=True)
    lp, h = logprobs_and_entropy(x, torch.zeros(2, 0, dtype=torch.long), entropy_grad=True)
    assert lp.shape == h.shape == (2, 0)
    (lp.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape


def test_rejects_bad_arguments():
    logits, targets, _, _ = _case()
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_and_entropy(logits, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets shape"):
        logprobs_and_entropy(logits, targets[:, :2])


# ---- from hidden states ------------------------------------------------------------------------


def _hidden_case(dtype, bias, seed=1, b=2, t=7, d=16, v=41):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    b_ = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (b, t), generator=g)
    return hidden, weight, b_, targets, torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)


def _hidden_grads(chunked, hidden, weight, bias, targets, g_lp, g_h, entropy_grad, **kw):
    leaves = [x.clone().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    b_ = leaves[2] if bias is not None else None
    if chunked:
        lp, h = logprobs_and_entropy_from_hidden(
            leaves[0], leaves[1], targets, lm_head_bias=b_, entropy_grad=entropy_grad, **kw
        )
    else:
        kw.pop("chunk_size", None)
        lp, h = naive_logprobs_and_entropy(
            F.linear(leaves[0], leaves[1], b_), targets, entropy_grad=entropy_grad, **kw
        )
    loss = (lp * g_lp).sum() + ((h * g_h).sum() if entropy_grad else 0.0)
    return lp.detach(), h.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_hidden_matches_naive(dtype, bias, entropy_grad):
    hidden, weight, b_, targets, g_lp, g_h = _hidden_case(dtype, bias)
    kw = {"temperature": 1.3, "chunk_size": 4}  # 4 does not divide 14 rows
    lp, h, grads = _hidden_grads(True, hidden, weight, b_, targets, g_lp, g_h, entropy_grad, **kw)
    lp0, h0, grads0 = _hidden_grads(False, hidden, weight, b_, targets, g_lp, g_h, entropy_grad, **kw)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        assert g.dtype == dtype and g.shape == g0.shape
        # bf16: the naive path rounds one big matmul, the chunked one accumulates chunks in fp32
        scale = g0.float().abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2 * scale
        assert (g.float() - g0.float()).abs().max() <= tol


def test_hidden_per_token_temperature_matches_naive():
    hidden, weight, b_, targets, g_lp, g_h = _hidden_case(torch.float32, True)
    temps = torch.tensor([0.5, 2.0])[torch.arange(targets.numel()) % 2].view(targets.shape)
    kw = {"temperature": temps, "chunk_size": 4}
    lp, h, grads = _hidden_grads(True, hidden, weight, b_, targets, g_lp, g_h, True, **kw)
    lp0, h0, grads0 = _hidden_grads(False, hidden, weight, b_, targets, g_lp, g_h, True, **kw)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        assert torch.allclose(g, g0, atol=1e-5)


def test_hidden_chunk_larger_than_rows_and_frozen_head():
    hidden, weight, _, targets, g_lp, _ = _hidden_case(torch.float32, False)
    h_ = hidden.clone().requires_grad_()
    lp, _ = logprobs_and_entropy_from_hidden(h_, weight, targets, chunk_size=1024)  # weight without grad
    (lp * g_lp).sum().backward()
    _, _, (grad0, _) = _hidden_grads(False, hidden, weight, None, targets, g_lp, None, False)
    assert torch.allclose(h_.grad, grad0, atol=1e-5)


def test_hidden_under_autocast_uses_autocast_dtype():
    hidden, weight, _, targets, _, _ = _hidden_case(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, h = logprobs_and_entropy_from_hidden(hidden, weight, targets, chunk_size=3)
    z = F.linear(hidden.bfloat16(), weight.bfloat16())  # what the LM head computes under autocast
    lp0, h0 = naive_logprobs_and_entropy(z, targets)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)


# ---- UCAS statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_self_certainty_and_token_logit(temperature):
    logits, targets, _, _ = _case(v=30)
    x = logits.clone().requires_grad_()
    c, tok = self_certainty_and_token_logit(x, targets, temperature=temperature, chunk_size=4)
    assert not c.requires_grad and not tok.requires_grad
    # c = KL(U || p) + log V, with p = softmax(logits / T)
    logp = torch.log_softmax(logits.double() / temperature, -1)
    kl = (-math.log(30) - logp).mean(-1)
    assert torch.allclose(c.double(), kl + math.log(30), atol=1e-5)
    # the sampled token's logit before the temperature (UCAS gathers before logits.div_)
    assert torch.equal(tok, logits.gather(-1, targets[..., None]).squeeze(-1))


def test_self_certainty_uniform_is_log_v():
    # uniform p: KL(U || p) = 0, so c = logsumexp(z) - mean(z) = (log 9 + 2) - 2
    c, _ = self_certainty_and_token_logit(torch.full((1, 4, 9), 2.0), torch.zeros(1, 4, dtype=torch.long))
    assert torch.allclose(c, torch.full((1, 4), math.log(9)), atol=1e-6)


# ---- Clip_V's vocabulary baseline --------------------------------------------------------------


def test_discriminator_baseline_three_token_vocabulary_by_hand():
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, sum p^2 = 3/8, sum p^2 log p = -(1/4) ln 2 - 2 (1/16)(2 ln 2)
    # = -(1/2) ln 2, so N = 1.5 ln 2 * 3/8 - 0.5 ln 2 = ln 2 / 16
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]])) + 3.0
    h = torch.tensor([[1.5 * math.log(2)]])
    assert discriminator_baseline(logits, h).item() == pytest.approx(math.log(2) / 16, abs=1e-7)
    # uniform over V: N = H / V + V (1/V^2) log(1/V) = 0
    assert discriminator_baseline(torch.zeros(1, 1, 5), torch.tensor([[math.log(5)]])).abs().item() < 1e-7


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_discriminator_baseline_matches_the_full_softmax(temperature):
    logits, targets, _, _ = _case(v=30)
    _, h = logprobs_and_entropy(logits, targets, temperature=temperature)
    got = discriminator_baseline(logits, h, temperature=temperature, chunk_size=4)
    p = torch.softmax(logits.double() / temperature, -1)
    want = h.double() * (p**2).sum(-1) + (p**2 * p.log()).sum(-1)  # Trinity-RFT compute_N_from_logits
    assert torch.allclose(got.double(), want, atol=1e-6)
    with pytest.raises(ValueError, match="entropy shape"):
        discriminator_baseline(logits, h[:, :2])


# ---- memory: no full fp32 [N, V] copy ----------------------------------------------------------


def _peak_live_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def test_peak_memory_stays_below_one_fp32_copy():
    n, v, chunk = 128, 4096, 8
    logits = torch.randn(1, n, v).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (1, n))
    full_fp32 = n * v * 4

    def step(fn, **kw):
        lp, h = fn(logits, targets, entropy_grad=True, **kw)
        (lp.sum() + h.sum()).backward()
        logits.grad = None

    chunked = _peak_live_bytes(lambda: step(logprobs_and_entropy, chunk_size=chunk))
    naive = _peak_live_bytes(lambda: step(naive_logprobs_and_entropy))
    # the bf16 gradient (n*v*2 bytes) plus a few fp32 [chunk, V] buffers, never n*v*4
    assert chunked < n * v * 2 + 4 * chunk * v * 4 + 64 * n < full_fp32
    assert naive > 2 * full_fp32


def test_clip_v_baseline_and_per_token_temperature_stay_chunked():
    # Clip_V's N_t (old pass, no grad) and ERA's per-token temperature (with grad): a few fp32
    # [chunk, V] buffers, never an fp32 copy of the [N, V] logits
    n, v, chunk = 128, 4096, 8
    logits = torch.randn(1, n, v).bfloat16()
    h = torch.rand(1, n)
    full_fp32 = n * v * 4
    peak = _peak_live_bytes(lambda: discriminator_baseline(logits, h, chunk_size=chunk))
    assert peak < 4 * chunk * v * 4 + 64 * n < full_fp32
    x = logits.clone().requires_grad_()
    targets = torch.randint(0, v, (1, n))
    temps = torch.rand(1, n) + 0.5

    def step():
        lp, ent = logprobs_and_entropy(x, targets, temperature=temps, chunk_size=chunk, entropy_grad=True)
        (lp.sum() + ent.sum()).backward()
        x.grad = None

    assert _peak_live_bytes(step) < n * v * 2 + 4 * chunk * v * 4 + 64 * n < full_fp32


class _LiveBuffers(TorchDispatchMode):
    """Peak bytes of the large tensors the ops allocate inside the mode (views and in-place results,
    which share an input's storage, are not allocations)."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes, self.live, self.peak = min_bytes, 0, 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes()
                if n >= self.min_bytes and t.untyped_storage().data_ptr() not in inputs:
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_backward_keeps_at_most_two_fp32_chunks_beside_the_logits_gradient(dtype, entropy_grad):
    B, T, V, C = 4, 32, 5000, 16
    logits = torch.randn(B, T, V, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    chunk_bytes = C * V * 4
    mode = _LiveBuffers(min_bytes=chunk_bytes // 4)
    with mode:
        lp, h = ops.logprobs_and_entropy(logits, targets, chunk_size=C, entropy_grad=entropy_grad, temperature=0.7)
        (lp.sum() + (h.sum() if entropy_grad else 0)).backward()
    grad_bytes = logits.numel() * logits.element_size()
    assert mode.peak <= grad_bytes + 2 * chunk_bytes, (mode.peak - grad_bytes) / chunk_bytes
    assert mode.peak >= grad_bytes + chunk_bytes  # the probe sees the chunk buffers at all

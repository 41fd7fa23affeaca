"""Memory-efficient token log-probs and full-vocabulary entropy (nats), forward and backward.

With a 152k vocabulary, ``log_softmax(logits.float())`` over a micro-batch materialises several fp32
[B*T, V] tensors (the upcast, the log-softmax output that autograd saves, its gradient). Here the
flattened B*T rows are processed ``chunk_size`` rows at a time: only one chunk's fp32 working set
(two [chunk, V] buffers) is alive at once, autograd saves only the logits in their own dtype plus
per-row log-sum-exp and entropy, and the backward pass recomputes each chunk's softmax.
Peak extra memory is therefore O(chunk_size * V) instead of O(B * T * V), plus the gradient of the
logits, which has their shape and dtype.

Gradients (z = logits / temperature, p = softmax(z), H = -sum_v p_v log p_v):
    d log p_t / d z = onehot(t) - p,        d H / d z = -p * (log p + H).

Every row must hold at least one finite logit; -inf entries (a masked vocabulary) are fine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# In fp32, exp(x) == 0 for x < -104, so clamping log p there changes nothing in p * log p while
# keeping 0 * (-inf) = NaN out of the entropy and its gradient.
_LOGP_FLOOR = -1e4


# A temperature is one float, or one per row of the flattened [N, V] logits (a per-token logit
# transform z' = s z is the temperature T / s at that token: ERA).
Temp = float | Tensor


def _check(temperature: Temp, chunk_size: int) -> None:
    if not bool((torch.as_tensor(temperature) > 0).all()):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _row_chunk(x: Tensor, flat: Tensor | None, i: int, j: int) -> Tensor:
    """Rows i:j of ``x`` [..., V] flattened to [N, V]; a view when ``x`` flattens without a copy."""
    if flat is not None:
        return flat[i:j]
    # Sliced logits (e.g. logits[:, P-1:-1]) cannot be viewed as [N, V]; gather only this chunk.
    idx = torch.unravel_index(torch.arange(i, j, device=x.device), x.shape[:-1])
    return x[idx]


def _flat_view(x: Tensor) -> Tensor | None:
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _rows(temperature: Temp, i: int, j: int) -> Temp:
    """The temperature of flattened rows i:j (a [j - i, 1] column when there is one per row)."""
    return temperature[i:j, None] if isinstance(temperature, Tensor) else temperature


def _div_(x: Tensor, temperature: Temp) -> Tensor:
    return x.div_(temperature) if isinstance(temperature, Tensor) or temperature != 1.0 else x


def _flat_temperature(temperature: Temp, targets: Tensor) -> Temp:
    if not isinstance(temperature, Tensor):
        return float(temperature)
    if temperature.shape != targets.shape:
        raise ValueError(
            f"per-token temperature shape {tuple(temperature.shape)} != targets shape {tuple(targets.shape)}"
        )
    return temperature.detach().reshape(-1).to(torch.float32).contiguous()


def _to_fp32_scaled(chunk: Tensor, temperature: Temp, owned: bool = False) -> Tensor:
    """A private fp32 copy of ``chunk`` divided by the temperature (safe to modify in place)."""
    z = chunk.to(torch.float32) if owned else chunk.to(torch.float32, copy=True)
    return _div_(z, temperature)


def _chunk_stats(z: Tensor, targets: Tensor, entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log p of targets, logsumexp, entropy) of an owned fp32 chunk ``z`` [n, V] (clobbered)."""
    tgt = z.gather(1, targets[:, None]).squeeze(1)
    if not entropy:
        lse = torch.logsumexp(z, -1)
        return tgt - lse, lse, None
    m = z.amax(-1, keepdim=True)
    z.sub_(m)
    p = z.exp()
    s = p.sum(-1, keepdim=True)
    p.div_(s)
    logs = s.log()
    z.sub_(logs).clamp_(min=_LOGP_FLOOR)  # z is now log p
    ent = -p.mul_(z).sum(-1)
    lse = (m + logs).squeeze(1)
    return tgt - lse, lse, ent


def _chunk_grad(
    z: Tensor, targets: Tensor, lse: Tensor, ent: Tensor | None, g_lp: Tensor, g_ent: Tensor | None
) -> Tensor:
    """d(sum g_lp * log p_t + g_ent * H)/dz for an owned fp32 chunk ``z`` (clobbered, returned)."""
    z.sub_(lse[:, None])  # log p
    if g_ent is None:  # -p * g_lp, in place: one buffer
        gz = z.exp_().mul_(-g_lp[:, None])
    else:
        p = z.exp()  # -p * (g_lp + g_ent * (log p + H))
        z.clamp_(min=_LOGP_FLOOR).add_(ent[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None])
        gz = z.mul_(p).neg_()
        del p
    return gz.scatter_add_(1, targets[:, None], g_lp[:, None])


class _LogpEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_size, entropy_grad, compute_entropy):
        flat, n = _flat_view(logits), targets.numel()
        tflat = targets.reshape(-1)
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty(n if compute_entropy else 0, dtype=torch.float32, device=logits.device)
        for i in range(0, n, chunk_size):
            j = min(i + chunk_size, n)
            z = _to_fp32_scaled(_row_chunk(logits, flat, i, j), _rows(temperature, i, j))
            lp, lse[i:j], e = _chunk_stats(z, tflat[i:j], compute_entropy)
            logp[i:j] = lp
            if e is not None:
                ent[i:j] = e
            del z
        ctx.save_for_backward(logits, tflat, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.entropy_grad = temperature, chunk_size, entropy_grad
        logp, ent = logp.view(targets.shape), ent.view(targets.shape) if compute_entropy else ent
        if not (entropy_grad and compute_entropy):
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, tflat, lse, ent = ctx.saved_tensors
        T, n = ctx.temperature, tflat.numel()
        flat = _flat_view(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat = grad.view(-1, logits.shape[-1])
        g_lp = torch.zeros(n, device=grad.device) if g_logp is None else g_logp.reshape(-1).float()
        g_h = g_ent.reshape(-1).float() if (ctx.entropy_grad and g_ent is not None) else None
        for i in range(0, n, ctx.chunk_size):
            j = min(i + ctx.chunk_size, n)
            z = _to_fp32_scaled(_row_chunk(logits, flat, i, j), _rows(T, i, j))
            gz = _chunk_grad(
                z,
                tflat[i:j],
                lse[i:j],
                ent[i:j] if g_h is not None else None,
                g_lp[i:j],
                None if g_h is None else g_h[i:j],
            )
            gflat[i:j] = _div_(gz, _rows(T, i, j))
            del z, gz  # or the next chunk's buffers are made while these are still alive
        return grad, None, None, None, None, None


def logprobs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: Temp = 1.0,
    chunk_size: int = 1024,
    entropy_grad: bool = False,
    compute_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """fp32 log p(targets) [B, T] and full-vocabulary entropy [B, T] of softmax(logits / temperature).

    ``temperature`` is a float or a [B, T] tensor of per-token temperatures.

    ``logits`` [B, T, V] in any float dtype; log-probs are differentiable when ``logits`` requires
    grad, the entropy only when ``entropy_grad`` (else it is detached). ``compute_entropy=False``
    skips the entropy (returns None).
    """
    _check(temperature, chunk_size)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != logits shape[:-1] {tuple(logits.shape[:-1])}"
        )
    logp, ent = _LogpEntropy.apply(
        logits,
        targets.long(),
        _flat_temperature(temperature, targets),
        int(chunk_size),
        bool(entropy_grad),
        bool(compute_entropy),
    )
    return logp, (ent if compute_entropy else None)


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    # Under autocast the LM head would run in the autocast dtype; reproduce that explicitly so the
    # forward and the recomputation in backward (where autocast is off) see the same logits.
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


class _HiddenLogpEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, chunk_size, entropy_grad, compute_entropy, cdt
    ):
        h, tflat, n = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), targets.numel()
        w, b = weight.to(cdt), None if bias is None else bias.to(cdt)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty(n if compute_entropy else 0, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, n, chunk_size):
                j = min(i + chunk_size, n)
                z = _to_fp32_scaled(F.linear(h[i:j].to(cdt), w, b), _rows(temperature, i, j), owned=True)
                lp, lse[i:j], e = _chunk_stats(z, tflat[i:j], compute_entropy)
                logp[i:j] = lp
                if e is not None:
                    ent[i:j] = e
        ctx.save_for_backward(hidden, weight, bias, tflat, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.entropy_grad, ctx.cdt = (
            temperature,
            chunk_size,
            entropy_grad,
            cdt,
        )
        logp, ent = logp.view(targets.shape), ent.view(targets.shape) if compute_entropy else ent
        if not (entropy_grad and compute_entropy):
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, tflat, lse, ent = ctx.saved_tensors
        T, n, cdt = ctx.temperature, tflat.numel(), ctx.cdt
        h = hidden.reshape(-1, hidden.shape[-1])
        w, b = weight.to(cdt), None if bias is None else bias.to(cdt)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if need_h else None
        # Weight/bias gradients accumulate over chunks in fp32 so low-precision inputs lose nothing.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        g_lp = torch.zeros(n, device=h.device) if g_logp is None else g_logp.reshape(-1).float()
        g_h = g_ent.reshape(-1).float() if (ctx.entropy_grad and g_ent is not None) else None
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, n, ctx.chunk_size):
                j = min(i + ctx.chunk_size, n)
                hc = h[i:j].to(cdt)
                z = _to_fp32_scaled(F.linear(hc, w, b), _rows(T, i, j), owned=True)
                gz = _chunk_grad(
                    z,
                    tflat[i:j],
                    lse[i:j],
                    ent[i:j] if g_h is not None else None,
                    g_lp[i:j],
                    None if g_h is None else g_h[i:j],
                )
                _div_(gz, _rows(T, i, j))
                if grad_b is not None:
                    grad_b += gz.sum(0)
                gzc = gz.to(cdt)
                if grad_h is not None:
                    grad_h[i:j] = gzc @ w
                if grad_w is not None:
                    if cdt == torch.float32:  # in place: no second [V, D] buffer
                        grad_w.addmm_(gzc.t(), hc)
                    else:
                        grad_w += gzc.t() @ hc
        grad_h = None if grad_h is None else grad_h.view(hidden.shape)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def logprobs_and_entropy_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    temperature: Temp = 1.0,
    chunk_size: int = 1024,
    entropy_grad: bool = False,
    compute_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``logprobs_and_entropy`` of logits = hidden @ W^T + b without materialising [B, T, V].

    ``hidden`` [B, T, D], ``lm_head_weight`` [V, D] (the full, unsharded head), ``targets`` [B, T].
    The matmul runs in the hidden states' dtype (or the active autocast dtype); softmax maths in
    fp32. Gradients flow to ``hidden``, the weight and the bias.
    """
    _check(temperature, chunk_size)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != hidden shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    logp, ent = _HiddenLogpEntropy.apply(
        hidden,
        lm_head_weight,
        lm_head_bias,
        targets.long(),
        _flat_temperature(temperature, targets),
        int(chunk_size),
        bool(entropy_grad),
        bool(compute_entropy),
        _matmul_dtype(hidden),
    )
    return logp, (ent if compute_entropy else None)


@torch.no_grad()
def self_certainty_and_token_logit(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """UCAS inputs (arXiv 2510.10649, METHODS §1.10), no grad, fp32 [B, T] each.

    Self-certainty c_t = logsumexp(z) - mean_v(z) with z = logits / temperature (= KL(U || p) + log V),
    and the sampled token's logit *before* the temperature, as in the official code
    (xvolcano02/UCAS ``dp_actor._forward_micro_batch``: gathered before ``logits.div_(temperature)``).
    A -inf logit makes c_t infinite, as it does there (KL from the uniform to a masked p).
    """
    _check(temperature, chunk_size)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != logits shape[:-1] {tuple(logits.shape[:-1])}"
        )
    flat, n, tflat = _flat_view(logits), targets.numel(), targets.reshape(-1).long()
    cert = torch.empty(n, dtype=torch.float32, device=logits.device)
    tok = torch.empty_like(cert)
    for i in range(0, n, chunk_size):
        j = min(i + chunk_size, n)
        z = _to_fp32_scaled(_row_chunk(logits, flat, i, j), 1.0)
        tok[i:j] = z.gather(1, tflat[i:j, None]).squeeze(1)
        if temperature != 1.0:
            z.div_(temperature)
        cert[i:j] = torch.logsumexp(z, -1) - z.mean(-1)
    return cert.view(targets.shape), tok.view(targets.shape)


@torch.no_grad()
def discriminator_baseline(
    logits: Tensor, entropy: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """Clip_V's vocabulary baseline (arXiv 2602.03392, METHODS §8.2), no grad, fp32 [B, T]:
    N_t = E_{v~p}[p_v (H_t + log p_v)] = H_t sum_v p_v^2 + sum_v p_v^2 log p_v, p = softmax(logits / T).

    ``entropy`` [B, T] is H_t of the same distribution (the old-policy pass already has it). One fp32
    [chunk, V] buffer at a time, as the Trinity-RFT ``compute_N_from_logits`` on the whole batch.
    """
    _check(temperature, chunk_size)
    if entropy.shape != logits.shape[:-1]:
        raise ValueError(
            f"entropy shape {tuple(entropy.shape)} != logits shape[:-1] {tuple(logits.shape[:-1])}"
        )
    flat, n, hflat = _flat_view(logits), entropy.numel(), entropy.reshape(-1).float()
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    for i in range(0, n, chunk_size):
        j = min(i + chunk_size, n)
        z = _to_fp32_scaled(_row_chunk(logits, flat, i, j), temperature)
        z = torch.log_softmax(z, -1).clamp_(min=_LOGP_FLOOR)  # log p; p^2 log p is 0 below the floor
        p2 = z.exp().square_()
        out[i:j] = hflat[i:j] * p2.sum(-1) + p2.mul_(z).sum(-1)
        del z, p2
    return out.view(entropy.shape)


def topk_logprobs(logits: Tensor, targets: Tensor, k: int, *, temperature: Temp = 1.0) -> Tensor:
    """log p(targets) [B, T] under the top-k logits renormalised (ERA's ``logprobs_from_logits_topk``,
    arXiv 2510.08549): z_t - logsumexp(top-k z) when the target is among the k largest logits, else
    -1e4 (a constant: no gradient). z = logits / temperature (a float or [B, T]); the top-k is taken
    on the raw logits (the same set for any positive temperature), so no scaled [N, V] copy is made.
    """
    _check(temperature, 1)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != logits shape[:-1] {tuple(logits.shape[:-1])}"
        )
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    top, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
    t = temperature[..., None] if isinstance(temperature, Tensor) else temperature
    lse = torch.logsumexp(top.float() / t, -1)
    target = logits.gather(-1, targets.long()[..., None]).squeeze(-1).float()
    chosen = (idx == targets.long()[..., None]).any(-1)
    t = temperature if isinstance(temperature, Tensor) else float(temperature)
    return torch.where(chosen, target / t - lse, torch.full_like(lse, _LOGP_FLOOR))


def naive_logprobs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: Temp = 1.0,
    entropy_grad: bool = False,
    compute_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Reference: plain ``log_softmax`` over the whole fp32 [B, T, V] (for tests and the benchmark)."""
    z = logits.float()
    t = temperature.unsqueeze(-1) if isinstance(temperature, Tensor) else temperature
    logp_all = torch.log_softmax(z / t, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not compute_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        p = logp_all.exp()
        ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, ent

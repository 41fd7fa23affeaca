"""RolloutBatch: the one data structure that flows through every component."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# RolloutBatch fields that only an advantage estimator fills (declared in its ``provides``).
ESTIMATOR_FIELDS = frozenset({"global_advantages", "blend_weights"})

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class AggNorm:
    """Normalisers of one mini-batch, pooled over micro-batches and ranks.

    A micro-batch's aggregated loss is its share of the mini-batch loss, scaled by the world size
    because data parallelism averages gradients over ranks. Summing the micro-batch losses of all
    ranks and dividing by ``world_size`` therefore gives exactly the mini-batch loss, whatever the
    split. ``tokens``/``seqs`` are keyed by the weight kind: "selected" (token_weights) or "response".
    """

    mode: str
    tokens: dict[str, float]
    seqs: dict[str, float]
    num_seqs: float  # every sequence of the mini-batch, empty or not (constant-normaliser mode)
    # seq-mean-token-sum-norm's constant C (T_max): sum / (num_seqs * C), the Dr. GRPO paper's
    # (arXiv 2503.20783); verl's agg_loss divides by C only, num_seqs times larger (a learning-rate factor)
    const: float
    world_size: int = 1


@dataclass(frozen=True)
class PolicyView:
    """Which distribution the log-probs of a batch are taken under, when a loss trains another one
    than the full model's softmax(z / T):

    ``layer``: a decoder layer's internal policy softmax(W_U h_layer / T) (BuPO's logit lens), 0-based
    (the output of decoder layer ``layer``); ``final_norm`` applies the final norm to h first.
    ``topk``: log p over the top-k logits renormalised, -1e4 outside them (ERA's scripts).
    """

    layer: int | None = None
    final_norm: bool = False
    topk: int | None = None


@dataclass
class RolloutBatch:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, T] right-padded
    response_mask: Tensor  # [B, T] 1 on real tokens, EOS included
    group_ids: Tensor  # [B] long
    truncated: Tensor  # [B] bool: hit max_new_tokens without EOS
    rewards: Tensor | None = None  # [B]
    old_logprobs: Tensor | None = None  # [B, T] pi_old at the training temperature
    entropy: Tensor | None = None  # [B, T] full-vocabulary entropy (nats) of pi_old
    ref_logprobs: Tensor | None = None  # [B, T] only when a KL term is on
    # [B, T] log-prob of each sampled token under the distribution it was drawn from (the sampler's
    # temperature, top-k and top-p applied; the engine's own numerics), 0 on padding
    rollout_logprobs: Tensor | None = None
    advantages: Tensor | None = None  # [B, T]
    token_weights: Tensor | None = None  # [B, T]
    step_weights: Tensor | None = None  # [B, T] a selector's weights fixed over the rollout (scope: step)
    # Optional per-token old-policy extras, filled only when a component lists them in `requires`.
    self_certainty: Tensor | None = None  # [B, T] logsumexp(z) - mean_v(z)  (UCAS)
    sampled_logits: Tensor | None = None  # [B, T] raw logit of the sampled token (UCAS)
    # [B, T] sum_v p_v^2 (H + log p_v) at the training temperature (Clip_V's vocabulary baseline)
    discriminator_baseline: Tensor | None = None
    paired_rewards: Tensor | None = None  # [B] reward of a second, index-paired sample (AAPO)
    # [B] an advantage fixed by a regularizer for the whole response (AEPO); NaN keeps the estimator's
    advantage_override: Tensor | None = None
    # Written by an advantage estimator that lists them in ``provides`` (COPO), read by a loss that
    # lists them in ``requires``: a second advantage and each response's weight on the first one.
    global_advantages: Tensor | None = None  # [B, T]
    blend_weights: Tensor | None = None  # [B] in [0, 1]: loss = w L(advantages) + (1 - w) L(global)
    # A loss that trains under transformed logits z' = s z (ERA): log pi_old at each of its
    # ``logit_scales`` [B, T, S] from the old-policy pass, and the per-token s it fixes after the
    # advantages (``PolicyLoss.prepare_rollout``), which the update's forward then applies.
    scaled_old_logprobs: Tensor | None = None
    logit_scale: Tensor | None = None  # [B, T]
    # The distribution the log-probs of this batch are taken under, when not the full model's
    # (BuPO's layer policy, ERA's top-k); set from the loss's ``policy_view()`` before the old pass.
    policy_view: PolicyView | None = None
    info: list[dict[str, Any]] = field(default_factory=list)
    agg_norm: AggNorm | None = None

    # ---- shape helpers -------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.response_ids.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def index(self, idx: Tensor | list[int] | slice) -> RolloutBatch:
        """A sub-batch of rows (tensor fields and info indexed alike)."""
        if isinstance(idx, slice):
            rows = list(range(self.size))[idx]
        else:
            rows = [int(i) for i in (idx.tolist() if isinstance(idx, Tensor) else idx)]
        t = torch.tensor(rows, dtype=torch.long, device=self.response_ids.device)
        out = dataclasses.replace(self)
        for name in self._tensor_fields():
            setattr(out, name, getattr(self, name).index_select(0, t))
        out.info = [self.info[i] for i in rows] if self.info else []
        return out

    def split(self, size: int) -> list[RolloutBatch]:
        return [self.index(slice(i, i + size)) for i in range(0, self.size, size)]

    @staticmethod
    def cat(batches: list[RolloutBatch], pad_id: int = 0) -> RolloutBatch:
        """Concatenate batches, padding prompts on the left and responses on the right."""
        first = batches[0]
        out = dataclasses.replace(first)
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.response_ids.shape[1] for b in batches)
        for name in first._tensor_fields():
            parts = []
            for b in batches:
                x = getattr(b, name)
                if x is None:
                    raise ValueError(f"cannot concatenate: field '{name}' missing in one batch")
                if x.dim() == 2 and name.startswith("prompt"):
                    fill = pad_id if name == "prompt_ids" else 0
                    x = torch.nn.functional.pad(x, (P - x.shape[1], 0), value=fill)
                elif x.dim() == 2:
                    fill = pad_id if name == "response_ids" else 0
                    x = torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)
                parts.append(x)
            setattr(out, name, torch.cat(parts, 0))
        out.info = [i for b in batches for i in b.info]
        return out

    def to(self, device: torch.device | str) -> RolloutBatch:
        out = dataclasses.replace(self)
        for name in self._tensor_fields():
            setattr(out, name, getattr(self, name).to(device))
        return out

    @property
    def weights(self) -> Tensor:
        """Token weights of the loss: the selector's, else the response mask."""
        w = self.token_weights if self.token_weights is not None else self.response_mask
        return w.to(torch.float32)

    # ---- aggregation ---------------------------------------------------------------------
    def agg(self, values: Tensor, kind: str = "selected", mode: str | None = None) -> Tensor:
        """Aggregate per-token ``values`` [B, T] into this micro-batch's share of the mini-batch loss.

        ``kind`` picks the weights: "selected" (token_weights) or "response" (response_mask).
        Without an ``agg_norm`` (a batch used on its own) the batch is its own mini-batch.
        """
        w = self.weights if kind == "selected" else self.response_mask.to(torch.float32)
        norm = self.agg_norm or make_agg_norm([self], mode or "token-mean", const=float(w.shape[-1]))
        mode = mode or norm.mode
        vw = torch.where(w > 0, values, torch.zeros_like(values)) * w
        if mode == "token-mean":
            out = vw.sum() / max(norm.tokens[kind], 1e-12)
        elif mode == "seq-mean-token-mean":
            per_seq = vw.sum(-1) / (w > 0).sum(-1).clamp_min(1)
            out = per_seq.sum() / max(norm.seqs[kind], 1e-12)
        elif mode == "seq-mean-token-sum":
            out = vw.sum() / max(norm.seqs[kind], 1e-12)
        elif mode == "seq-mean-token-sum-norm":
            out = vw.sum() / max(norm.num_seqs * norm.const, 1e-12)
        else:
            raise ValueError(f"unknown aggregation mode '{mode}'; choose one of {AGG_MODES}")
        return out * norm.world_size


def make_agg_norm(batches: list[RolloutBatch], mode: str, const: float, reduce: bool = False) -> AggNorm:
    """Normalisers over ``batches`` (one mini-batch), summed over ranks when ``reduce``."""
    from lightning_entropy.components.common import all_reduce_sum, world_size

    rows = []
    for b in batches:
        for kind, w in (("selected", b.weights), ("response", b.response_mask.to(torch.float32))):
            # denominators count tokens (w > 0), so fractional weights (STEER) scale per-token losses
            # as in verl, where the weights multiply the loss and the mask count normalises it
            rows.append((kind, (w > 0).sum(), (w.sum(-1) > 0).sum()))
    sel = [r for r in rows if r[0] == "selected"]
    res = [r for r in rows if r[0] == "response"]
    stats = torch.stack(
        [
            sum(r[1] for r in sel),
            sum(r[2] for r in sel),
            sum(r[1] for r in res),
            sum(r[2] for r in res),
            torch.tensor(float(sum(b.size for b in batches)), device=batches[0].response_mask.device),
        ]
    ).float()
    ws = 1
    if reduce:
        stats = all_reduce_sum(stats)
        ws = world_size()
    s = stats.tolist()
    return AggNorm(
        mode=mode,
        tokens={"selected": s[0], "response": s[2]},
        seqs={"selected": s[1], "response": s[3]},
        num_seqs=s[4],
        const=const,
        world_size=ws,
    )

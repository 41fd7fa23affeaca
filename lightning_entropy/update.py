"""The update stage of an RL step: PPO epochs x mini-batches, each one optimizer step accumulated
over micro-batches; plus the optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch, make_agg_norm
from lightning_entropy.components.common import world_size
from lightning_entropy.components.losses import kl_penalty, rollout_correction_weights
from lightning_entropy.forward import PolicyForward
from lightning_entropy.metrics import MetricBank, SumRatio

# Losses arrive as each micro-batch's share of its mini-batch loss: summed, counted once per mini-batch.
LOSS_KEYS = ("train/pg_loss", "train/reg_loss", "train/kl_ref")


@dataclass
class UpdateSchedule:
    ppo_epochs: int = 1
    mini_batch_size: int | None = None  # sequences per optimizer step, global; None = whole rollout
    shuffle: bool = False
    seed: int = 0

    def minibatches(self, batch: RolloutBatch, rollout_size: int, step: int) -> list[tuple[Tensor, RolloutBatch]]:
        """(row indices, sub-batch) of this rank's rows for each optimizer step of one epoch."""
        per_rank = (self.mini_batch_size or rollout_size) // world_size()
        order = torch.arange(batch.size)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + step)
            order = torch.randperm(batch.size, generator=g)
        return [(order[i : i + per_rank], batch.index(order[i : i + per_rank])) for i in range(0, batch.size, per_rank)]


class PolicyUpdate:
    """Token selection, policy loss + regularizer + KL, gradient accumulation, clipping, steps.

    The loss normalisers are pooled over each mini-batch and all ranks before its micro-batches run,
    so the summed gradient depends on neither the micro-batch size nor the number of ranks. A step
    whose loss or gradient is not finite is skipped (``train/skipped_updates``).
    """

    def __init__(
        self,
        components: dict[str, Any],
        forward: PolicyForward,
        schedule: UpdateSchedule,
        agg_mode: str,
        const: float | None,
        kl_coef: float = 0.0,
        kl_type: str = "k3",
        grad_clip: float | None = None,
        drop_truncated: bool = False,
        rollout_correction: tuple[str, float] = ("none", 2.0),
    ) -> None:
        self.loss, self.regularizer, self.selector = components["loss"], components["regularizer"], components["selector"]
        self.forward, self.schedule = forward, schedule
        self.agg_mode, self.const = agg_mode, const
        self.kl_coef, self.kl_type, self.grad_clip = kl_coef, kl_type, grad_clip
        self.drop_truncated = drop_truncated  # DAPO's overlong filtering
        self.correction, self.correction_cap = rollout_correction  # none | tis | mis, and its cap C

    def run(
        self,
        batch: RolloutBatch,
        step: int,
        rollout_size: int,
        policy: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        backward: Callable[[Tensor], None],
        bank: MetricBank,
    ) -> int:
        """All updates of one rollout; returns how many were skipped as non-finite."""
        skipped = 0
        fill = batch.old_logprobs is None  # an on-policy step: pi_old comes from the update's forward
        for _ in range(self.schedule.ppo_epochs):
            for rows, mb in self.schedule.minibatches(batch, rollout_size, step):
                optimizer.zero_grad()
                self.accumulate_gradients(policy, mb, step, backward, bank)
                if fill:
                    _write_rows(batch, rows, mb)
                params = [p for p in policy.parameters() if p.grad is not None]
                # the norm before clipping; an infinite max_norm only measures it
                gn = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf) if params else None
                if hasattr(gn, "full_tensor"):  # FSDP2: a DTensor, the same norm on every rank
                    gn = gn.full_tensor()
                if gn is not None and not torch.isfinite(gn):
                    optimizer.zero_grad()
                    skipped += 1
                    continue
                if gn is not None:
                    bank.update("train/grad_norm", gn, 1.0, kind=SumRatio)
                optimizer.step()
                scheduler.step()
                self.record_selection(mb, bank)
        bank.update("train/skipped_updates", float(skipped), 1.0, kind=SumRatio)
        return skipped

    def accumulate_gradients(
        self,
        policy: torch.nn.Module,
        mb: RolloutBatch,
        step: int,
        backward: Callable[[Tensor], None],
        bank: MetricBank,
    ) -> None:
        """Select tokens, then forward/backward every micro-batch of one mini-batch (this rank's rows)."""
        mb.token_weights = self.selector(mb).to(torch.float32) * mb.response_mask
        if self.drop_truncated:  # out of the loss and of its token-mean denominator
            mb.token_weights = mb.token_weights * (~mb.truncated)[:, None]
        if self.correction == "mis":  # rejected tokens leave the loss and its denominator (verl)
            kept = self.correction_weights(mb)
            mb.token_weights = mb.token_weights * kept
            bank.update("train/mis_kept_frac", kept, mb.response_mask.float())
        const = float(self.const or mb.response_ids.shape[1])
        norm = mb.agg_norm = make_agg_norm([mb], self.agg_mode, const=const, reduce=True)
        self.loss.prepare(mb)
        self.regularizer.prepare(mb)
        fill = mb.old_logprobs is None
        filled: list[tuple[Tensor, Tensor]] = []
        for micro in self.forward.micro_batches(mb):
            micro.agg_norm = norm
            loss = self.micro_loss(policy, micro, step, micro.size / mb.size, bank)
            backward(loss)
            if fill:
                filled.append((micro.old_logprobs, micro.entropy))
        if fill:
            mb.old_logprobs = torch.cat([f[0] for f in filled])
            mb.entropy = torch.cat([f[1] for f in filled])
        for k in LOSS_KEYS:
            if k in bank.metrics:
                bank.update(k, 0.0, 1.0, kind=SumRatio)

    def micro_loss(
        self, policy: torch.nn.Module, micro: RolloutBatch, step: int, scale: float, bank: MetricBank
    ) -> Tensor:
        reg = self.regularizer
        logits, logprobs, entropy = self.forward.logprobs_entropy(
            policy, micro, entropy_grad=reg.needs_entropy_grad, keep_logits=reg.needs_logits
        )
        mask = micro.response_mask.float()
        if micro.old_logprobs is None:  # on-policy: the ratio is exactly 1, as in the skipped pass
            micro.old_logprobs = logprobs.detach() * mask
            micro.entropy = entropy.detach() * mask
        if self.selector.scope == "micro":
            # the official codes' per-micro-batch statistics: normalise within the micro-batch and
            # weight by its share of the mini-batch, like gradient accumulation in verl
            micro.token_weights = (
                self.selector.micro(micro, entropy.detach(), logprobs.detach()).to(torch.float32)
                * micro.response_mask
            )
            micro.agg_norm = make_agg_norm([micro], self.agg_mode, const=micro.agg_norm.const)
            micro.agg_norm.tokens = {k: v / scale for k, v in micro.agg_norm.tokens.items()}
            micro.agg_norm.seqs = {k: v / scale for k, v in micro.agg_norm.seqs.items()}
        per_tok, lstats = self.loss(logprobs, micro, entropy)
        if self.correction == "tis":  # truncated IS weight on each token's policy-gradient loss
            w = self.correction_weights(micro)
            per_tok = per_tok * w
            bank.update("train/tis_weight", w, mask)
        pg = micro.agg(per_tok, mode=self.agg_mode)
        view = logits / self.forward.temperature if reg.needs_logits else None
        reg_loss, rstats = reg(view, logprobs, entropy, micro, step)
        total = pg + reg_loss
        bank.update("train/pg_loss", pg.detach(), 0.0, kind=SumRatio)
        bank.update("train/reg_loss", reg_loss.detach(), 0.0, kind=SumRatio)
        if self.kl_coef > 0:
            kl = micro.agg(kl_penalty(logprobs, micro.ref_logprobs, self.kl_type), kind="response")
            total = total + self.kl_coef * kl
            bank.update("train/kl_ref", kl.detach(), 0.0, kind=SumRatio)
        with torch.no_grad():
            bank.update("train/approx_kl", kl_penalty(micro.old_logprobs, logprobs.detach(), "k3"), mask)
            for prefix, src in (
                ("loss/", {**lstats, **self.loss.metrics}),
                ("regularizer/", {**rstats, **reg.metrics}),
            ):
                for k, v in src.items():
                    bank.tokens(prefix + k, v, mask)
        self.loss.metrics.clear()
        reg.metrics.clear()
        return total

    def correction_weights(self, b: RolloutBatch) -> Tensor:
        if b.rollout_logprobs is None:
            raise RuntimeError(
                f"algo.rollout_correction={self.correction} needs the sampler's log-probs of the sampled "
                "tokens (RolloutBatch.rollout_logprobs), and the sampler returned none"
            )
        return rollout_correction_weights(
            b.old_logprobs, b.rollout_logprobs, b.response_mask, self.correction, self.correction_cap
        )

    def record_selection(self, mb: RolloutBatch, bank: MetricBank) -> None:
        """What the selector kept in this mini-batch and the entropy of the kept tokens."""
        mask = mb.response_mask.float()
        sel = (mb.token_weights > 0).float() * mask
        bank.update("train/entropy_selected", mb.entropy, sel)
        bank.update("selector/kept_frac", sel, mask)
        for k, v in self.selector.metrics.items():
            if k != "kept_frac":  # the update's own, pooled over ranks
                bank.tokens(f"selector/{k}", v, mask)
        self.selector.metrics.clear()


def _write_rows(batch: RolloutBatch, rows: Tensor, mb: RolloutBatch) -> None:
    """Copy a mini-batch's on-policy log-probs and entropy back into the rollout (for its logs)."""
    if batch.old_logprobs is None:
        batch.old_logprobs = mb.old_logprobs.new_zeros(batch.response_mask.shape)
        batch.entropy = torch.zeros_like(batch.old_logprobs)
    r = rows.to(batch.old_logprobs.device)
    batch.old_logprobs[r] = mb.old_logprobs
    batch.entropy[r] = mb.entropy


def warn_if_clipping_is_inert(loss: Any, updates_per_step: int) -> None:
    """A loss that acts through the importance ratio does nothing more than REINFORCE when every
    update is on-policy: the ratio is exactly 1."""
    if loss.ratio_dependent and updates_per_step == 1:
        warnings.warn(
            f"loss '{loss.registry_name}' acts through the importance ratio, but every update is on-policy "
            "(algo.ppo_epochs=1, one mini-batch): the ratio is 1 and clipping does nothing. Set "
            "algo.mini_batch_size or algo.ppo_epochs to make it bite (clip fractions are logged).",
            stacklevel=2,
        )


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` optimizer steps, then constant / linear / cosine decay to
    ``min_ratio``. (transformers' schedulers start warm-up at 0 and decay linearly to 0 only.)"""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        scale = 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * scale

    return f


def build_optimizer(params: list[torch.nn.Parameter], o: Any, total_steps: int) -> tuple[Any, Any]:
    """Optimizer (fused AdamW/Adam where the device supports it, ``optim.fused``) and LR schedule."""
    if o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        fused = bool(o.get("fused", True)) and all(
            p.device.type in ("cpu", "cuda", "xpu", "mps") and p.dtype.is_floating_point for p in params
        )
        try:
            opt = cls(params, fused=fused, **kw) if fused else cls(params, **kw)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            opt = cls(params, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(o.schedule, o.warmup_steps, total_steps, o.min_lr_ratio)
    )
    return opt, sched

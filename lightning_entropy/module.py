"""The LightningModule: rollout -> rewards -> old-policy pass -> advantages -> PPO-style updates.

Manual optimisation: one training_step is one RL step (one rollout), followed by
``ppo_epochs`` x mini-batches of optimizer steps, each accumulated over micro-batches. The policy is
built in ``configure_model`` so sharded strategies can wrap it at init.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor

from lightning_entropy import metrics as M
from lightning_entropy import ops
from lightning_entropy.batch import RolloutBatch, make_agg_norm
from lightning_entropy.components.common import all_reduce_sum, is_distributed, masked_sum, world_size
from lightning_entropy.config import COMPONENT_SECTIONS, build_component, saved_container
from lightning_entropy.models import load_policy, load_tokenizer


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from sampled tokens (Schulman's k1, k2, k3)."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    # k3 = exp(ref - logp) - (ref - logp) - 1, clamped like verl for stability
    return (torch.exp(-log_ratio) + log_ratio - 1).clamp(-10, 10)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        scale = 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * scale

    return f


class RLVRModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, policy_path: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.policy_path = str(policy_path)
        comps = {s: build_component(cfg, s) for s in COMPONENT_SECTIONS}
        self.sampler = comps["sampler"]
        self.reward_fn = comps["reward"]
        self.advantage_fn = comps["advantage"]
        self.selector = comps["selector"]
        self.policy_loss = comps["loss"]
        self.regularizer = comps["regularizer"]
        self.val_reward_fn = self._val_reward()
        self.group_size = int(cfg.sampler.get("group_size", 1))
        self.agg_mode = self.policy_loss.agg_override or cfg.loss.get("agg", "token-mean")
        self.temperature = (
            cfg.algo.temperature
            if cfg.algo.temperature is not None
            else float(getattr(self.sampler, "temperature", 1.0) or 1.0)
        )
        self.max_new_tokens = int(getattr(self.sampler, "max_new_tokens", 0) or 0)
        self.tokenizer = load_tokenizer(self.policy_path)
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        self.rl_step = 0
        self.last_validation: dict[str, float] = {}
        self._needs = set().union(*(c.requires for c in comps.values()))
        self._warned_on_policy = False
        self.train_metrics = torch.nn.ModuleDict(
            {
                "entropy": M.TokenMean(),
                "entropy_q": M.TokenQuantiles(),
                "cov_logp_adv": M.Covariance(),
                "zero_var_groups": M.ZeroVarianceGroups(),
            }
        )
        self.val_acc = M.TokenMean()
        self.val_passk = M.PassAtK(ks=list(cfg.logging.pass_k))

    # ---- model ---------------------------------------------------------------------------
    @property
    def uses_ref(self) -> bool:
        return self.cfg.algo.kl_coef > 0 or "ref_logprobs" in self._needs

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        m = self.cfg.model
        self.policy = load_policy(
            self.policy_path, dtype=m.dtype, gradient_checkpointing=m.gradient_checkpointing
        )
        self.policy.train()  # from_pretrained returns eval mode; log-prob passes switch to eval themselves
        if self.uses_ref:
            self.ref_policy = load_policy(self.policy_path, dtype=m.dtype)
            self.ref_policy.requires_grad_(False).eval()

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
            opt = cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        total = self.cfg.trainer.max_steps * self.updates_per_step
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(o.schedule, o.warmup_steps, total, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def rollout_size(self) -> int:
        return self.cfg.data.prompts_per_step * self.group_size

    @property
    def minibatches_per_epoch(self) -> int:
        return self.rollout_size // (self.cfg.algo.mini_batch_size or self.rollout_size)

    @property
    def updates_per_step(self) -> int:
        return self.cfg.algo.ppo_epochs * self.minibatches_per_epoch

    def _val_reward(self) -> Any:
        from lightning_entropy.registry import REWARDS

        name = self.cfg.logging.get("val_reward") or None
        if name is None and not (
            self.reward_fn.needs_policy_stats or getattr(self.reward_fn, "unsupervised", False)
        ):
            return self.reward_fn
        name = name or TASK_REWARDS.get(self.cfg.data.task, "math_verify")
        return REWARDS.build(name, {}, key="logging.val_reward")

    # ---- forward passes --------------------------------------------------------------------
    @staticmethod
    def _inputs(b: RolloutBatch) -> dict[str, Tensor]:
        ids = torch.cat([b.prompt_ids, b.response_ids], 1)
        attn = torch.cat([b.prompt_mask, b.response_mask], 1)
        # left padding: positions count real tokens, exactly as generate() numbered them
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "use_cache": False}

    def _forward_logits(self, model: torch.nn.Module, b: RolloutBatch) -> Tensor:
        """Next-token logits at the response positions [B, T, V] (raw, before temperature)."""
        T = b.response_ids.shape[1]
        return model(**self._inputs(b), logits_to_keep=T + 1).logits[:, :T]

    def _forward_from_hidden(self, b: RolloutBatch, entropy_grad: bool) -> tuple[Tensor, Tensor]:
        """Log-probs and entropy straight from the last hidden states and the LM head, chunked, so
        the [B, T, V] logits never exist (for large vocabularies)."""
        T = b.response_ids.shape[1]
        hidden = self.policy.get_decoder()(**self._inputs(b)).last_hidden_state[:, -T - 1 : -1]
        head = self.policy.get_output_embeddings()
        return ops.logprobs_and_entropy_from_hidden(
            hidden,
            head.weight,
            b.response_ids,
            lm_head_bias=head.bias,
            temperature=self.temperature,
            chunk_size=self.cfg.algo.chunk_size,
            entropy_grad=entropy_grad,
        )

    def _micro_size(self, n: int) -> int:
        return self.cfg.algo.micro_batch_size or n

    @torch.no_grad()
    def old_policy_pass(self, batch: RolloutBatch) -> None:
        """log pi_old and full-vocabulary entropy at the training temperature (eval mode, no grad)."""
        was = self.policy.training
        self.policy.eval()
        lp, ent, sc, sl, ref = [], [], [], [], []
        for mb in batch.split(self._micro_size(batch.size)):
            logits = self._forward_logits(self.policy, mb)
            a, h = ops.logprobs_and_entropy(
                logits, mb.response_ids, temperature=self.temperature, chunk_size=self.cfg.algo.chunk_size
            )
            lp.append(a)
            ent.append(h)
            if self._needs & {"self_certainty", "sampled_logits"}:
                c, z = ops.self_certainty_and_token_logit(
                    logits, mb.response_ids, temperature=self.temperature, chunk_size=self.cfg.algo.chunk_size
                )
                sc.append(c)
                sl.append(z)
            if self.uses_ref:
                rl, _ = ops.logprobs_and_entropy(
                    self._forward_logits(self.ref_policy, mb),
                    mb.response_ids,
                    temperature=self.temperature,
                    compute_entropy=False,
                    chunk_size=self.cfg.algo.chunk_size,
                )
                ref.append(rl)
        self.policy.train(was)
        mask = batch.response_mask.float()
        batch.old_logprobs = torch.cat(lp) * mask
        batch.entropy = torch.cat(ent) * mask
        if sc:
            batch.self_certainty = torch.cat(sc) * mask
            batch.sampled_logits = torch.cat(sl) * mask
        if ref:
            batch.ref_logprobs = torch.cat(ref) * mask

    # ---- rollout ---------------------------------------------------------------------------
    def score(self, batch: RolloutBatch, references: list[str | None], reward_fn: Any) -> None:
        prompts = [i["prompt"] for i in batch.info]
        completions = [i["completion"] for i in batch.info]
        rewards, infos = reward_fn(prompts, completions, references)
        batch.rewards = rewards.to(batch.response_ids.device, torch.float32)
        for i, extra in enumerate(infos):
            batch.info[i].update(extra, reference=references[i])

    def rollout(
        self, examples: list[Any], group_offset: int, temperature: float | None = None
    ) -> RolloutBatch:
        prompts = [e.prompt for e in examples]
        kw = {} if temperature is None else {"temperature": temperature}
        batch = self.sampler.generate(self.policy, self.tokenizer, prompts, self.group_size, **kw)
        batch.group_ids = batch.group_ids + group_offset
        refs = [examples[i // self.group_size].answer for i in range(batch.size)]
        if not self.reward_fn.needs_policy_stats:
            self.score(batch, refs, self.reward_fn)
        else:
            for i, r in enumerate(refs):
                batch.info[i]["reference"] = r
        return batch

    # ---- training --------------------------------------------------------------------------
    def training_step(self, data: dict[str, Any], batch_idx: int) -> None:
        examples, offset = data["examples"], int(data["group_offset"])
        step = self.rl_step
        batch = self.rollout(examples, offset)

        def resample(rows: list[int], temperature: float) -> RolloutBatch:
            picked = [examples[(batch.group_ids[r].item() - offset)] for r in rows]
            out = self.rollout(picked, 0, temperature=temperature)
            out.group_ids = batch.group_ids[
                torch.tensor(rows, device=out.group_ids.device)
            ].repeat_interleave(self.group_size)
            return out

        batch = self.regularizer.modify_rollout(batch, resample)
        self.old_policy_pass(batch)
        if self.reward_fn.needs_policy_stats:
            rewards, infos = self.reward_fn.score_batch(batch)
            batch.rewards = rewards.to(batch.response_ids.device, torch.float32)
            for i, extra in enumerate(infos):
                batch.info[i].update(extra)
        if "paired_rewards" in self._needs:
            batch.paired_rewards = self._paired_rewards(examples, batch)
        batch.advantages = self.advantage_fn(batch) * batch.response_mask
        overrides = [i.get("advantage_override") for i in batch.info]
        if any(o is not None for o in overrides):
            rows = torch.tensor(
                [k for k, o in enumerate(overrides) if o is not None], device=batch.rewards.device
            )
            vals = torch.tensor([o for o in overrides if o is not None], device=batch.rewards.device)
            batch.advantages[rows] = vals.unsqueeze(-1) * batch.response_mask[rows]
        self._log_rollout(batch)
        self._update(batch, step)
        self.rl_step += 1
        summary = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        for comp in (
            self.sampler,
            self.reward_fn,
            self.advantage_fn,
            self.selector,
            self.policy_loss,
            self.regularizer,
        ):
            comp.end_step(summary)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "mark_consumed"):
            dm.mark_consumed(int(data["index"]))

    def _paired_rewards(self, examples: list[Any], batch: RolloutBatch) -> Tensor:
        """AAPO's reference rewards: a second sample per response, index-paired, drawn by the current
        rollout policy with the same sampler settings."""
        second = self.rollout(examples, 0)
        return second.rewards

    def _minibatches(self, batch: RolloutBatch) -> list[RolloutBatch]:
        per_rank = (self.cfg.algo.mini_batch_size or self.rollout_size) // world_size()
        order = list(range(batch.size))
        if self.cfg.algo.shuffle_minibatches:
            g = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.rl_step)
            order = torch.randperm(batch.size, generator=g).tolist()
        return [batch.index(order[i : i + per_rank]) for i in range(0, batch.size, per_rank)]

    def _update(self, batch: RolloutBatch, step: int) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        if self.policy_loss.ratio_dependent and self.updates_per_step == 1 and not self._warned_on_policy:
            warnings.warn(
                f"loss '{self.policy_loss.registry_name}' acts through the importance ratio, but every update "
                "is on-policy (algo.ppo_epochs=1, one mini-batch): the ratio is 1 and clipping does nothing. "
                "Set algo.mini_batch_size or algo.ppo_epochs to make it bite (clip fractions are logged).",
                stacklevel=2,
            )
            self._warned_on_policy = True
        sums: dict[str, list[float]] = {}
        for _ in range(self.cfg.algo.ppo_epochs):
            for mb in self._minibatches(batch):
                opt.zero_grad()
                _add_stats(sums, self.accumulate_gradients(mb, step))
                if self.cfg.optim.grad_clip:
                    gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.grad_clip)
                    _add_stats(sums, {"train/grad_norm": [float(gn), 1.0]})
                opt.step()
                sched.step()
                _add_stats(sums, self._selection_stats(mb))
        for k, v in _reduce_stats(sums, self.device).items():
            self.log(k, v, on_step=True)
        self.log("train/lr", sched.get_last_lr()[0], on_step=True)

    def accumulate_gradients(self, mb: RolloutBatch, step: int) -> dict[str, list[float]]:
        """Select tokens, then forward/backward every micro-batch of one mini-batch (this rank's rows).

        The loss normalisers are pooled over the whole mini-batch and all ranks first, so the summed
        gradient does not depend on the micro-batch size or the number of ranks. Returns this rank's
        statistics as [sum, count] pairs, so they can be pooled over micro-batches and ranks exactly.
        """
        mb.token_weights = self.selector(mb).to(torch.float32) * mb.response_mask
        const = float(self.max_new_tokens or mb.response_ids.shape[1])
        norm = make_agg_norm([mb], self.agg_mode, const=const, reduce=True)
        mb.agg_norm = norm
        self.policy_loss.prepare(mb)
        self.regularizer.prepare(mb)
        stats: dict[str, list[float]] = {}
        for micro in mb.split(self._micro_size(mb.size)):
            micro.agg_norm = norm
            loss, micro_stats = self._micro_loss(micro, step, scale=micro.size / mb.size)
            if self._trainer is not None:
                self.manual_backward(loss)
            else:
                loss.backward()
            _add_stats(stats, micro_stats)
        for k in LOSS_KEYS & stats.keys():  # the micro-batch shares add up to one mini-batch loss
            stats[k][1] += 1.0
        return stats

    def _micro_loss(
        self, micro: RolloutBatch, step: int, scale: float
    ) -> tuple[Tensor, dict[str, list[float]]]:
        reg = self.regularizer
        if self.cfg.algo.logits_from_hidden and not reg.needs_logits:
            logits = None
            logprobs, entropy = self._forward_from_hidden(micro, reg.needs_entropy_grad)
        else:
            logits = self._forward_logits(self.policy, micro)
            logprobs, entropy = ops.logprobs_and_entropy(
                logits,
                micro.response_ids,
                temperature=self.temperature,
                chunk_size=self.cfg.algo.chunk_size,
                entropy_grad=reg.needs_entropy_grad,
            )
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
        per_tok, lstats = self.policy_loss(logprobs, micro, entropy)
        pg = micro.agg(per_tok, mode=self.agg_mode)
        view = logits / self.temperature if reg.needs_logits else None
        reg_loss, rstats = reg(view, logprobs, entropy, micro, step)
        total = pg + reg_loss
        # losses are this micro-batch's share of the mini-batch loss (x world size): summed, counted once
        stats: dict[str, list[float]] = {
            "train/pg_loss": [pg.item(), 0.0],
            "train/reg_loss": [reg_loss.item(), 0.0],
        }
        if self.cfg.algo.kl_coef > 0:
            kl = micro.agg(kl_penalty(logprobs, micro.ref_logprobs, self.cfg.algo.kl_type), kind="response")
            total = total + self.cfg.algo.kl_coef * kl
            stats["train/kl_ref"] = [kl.item(), 0.0]
        with torch.no_grad():
            mask = micro.response_mask.float()
            approx = kl_penalty(micro.old_logprobs, logprobs.detach(), "k3")
            stats["train/approx_kl"] = _stat_pair(approx, mask)
            for prefix, src in (
                ("loss", {**lstats, **self.policy_loss.metrics}),
                ("regularizer", {**rstats, **reg.metrics}),
            ):
                for k, v in src.items():
                    stats[f"{prefix}/{k}"] = _stat_pair(v, mask)
        self.policy_loss.metrics.clear()
        reg.metrics.clear()
        return total, stats

    # ---- logging ---------------------------------------------------------------------------
    def _log_rollout(self, batch: RolloutBatch) -> None:
        mask = batch.response_mask.float()
        tm = self.train_metrics
        tm["entropy"].update(batch.entropy, mask)
        tm["entropy_q"].update(batch.entropy, mask)
        tm["cov_logp_adv"].update(batch.old_logprobs, batch.advantages, mask)
        tm["zero_var_groups"].update(batch.rewards, batch.group_ids)
        for name in ("entropy", "cov_logp_adv", "zero_var_groups"):
            self.log(f"train/{name}", tm[name].compute(), on_step=True, prog_bar=name == "entropy")
            tm[name].reset()
        q = tm["entropy_q"].compute()
        for k, v in q.items():
            self.log(f"train/entropy_{k}", v, on_step=True)
        tm["entropy_q"].reset()
        r = batch.rewards.float()
        n = torch.tensor([float(r.numel())], device=r.device)
        s = all_reduce_sum(
            torch.stack(
                [r.sum(), (r * r).sum(), n[0], batch.lengths.float().sum(), batch.truncated.float().sum()]
            )
        )
        mean = s[0] / s[2]
        self.log("train/reward", mean, on_step=True, prog_bar=True)
        self.log("train/reward_std", (s[1] / s[2] - mean**2).clamp_min(0).sqrt(), on_step=True)
        self.log("train/response_len", s[3] / s[2], on_step=True)
        self.log("train/truncated_frac", s[4] / s[2], on_step=True)
        adv = batch.advantages
        seq_adv = (adv * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        zero_seq = ((adv == 0) | (mask == 0)).all(-1).float()
        a = all_reduce_sum(
            torch.stack(
                [
                    masked_sum(adv, mask),
                    masked_sum(adv * adv, mask),
                    mask.sum(),
                    masked_sum((adv == 0).float(), mask),
                    masked_sum((adv > 0).float(), mask),
                    zero_seq.sum(),
                    torch.tensor(float(adv.shape[0]), device=adv.device),
                ]
            )
        )
        amean = a[0] / a[2].clamp_min(1)
        self.log("adv/mean", amean, on_step=True)
        self.log("adv/std", (a[1] / a[2].clamp_min(1) - amean**2).clamp_min(0).sqrt(), on_step=True)
        self.log("adv/zero_frac", a[5] / a[6].clamp_min(1), on_step=True)  # responses with A = 0 throughout
        self.log("adv/zero_token_frac", a[3] / a[2].clamp_min(1), on_step=True)
        self.log("adv/pos_frac", a[4] / a[2].clamp_min(1), on_step=True)
        pairs = {"adv/seq_abs_mean": [float(seq_adv.abs().sum()), float(seq_adv.numel())]}
        for prefix, comp in (
            (f"adv/{self.advantage_fn.registry_name}", self.advantage_fn),
            ("rollout", self.reward_fn),
            ("rollout", self.sampler),
            ("regularizer/rollout", self.regularizer),
        ):  # the last: set by modify_rollout
            for k, v in comp.metrics.items():
                pairs[f"{prefix}/{k}" if prefix != "regularizer/rollout" else f"{prefix}_{k}"] = _stat_pair(
                    v, mask
                )
        for k, v in _reduce_stats(pairs, self.device).items():
            self.log(k, v, on_step=True)
        for c in (self.advantage_fn, self.reward_fn, self.sampler, self.regularizer):
            c.metrics.clear()
        self.log("train/rl_step", float(self.rl_step), on_step=True)

    def _selection_stats(self, mb: RolloutBatch) -> dict[str, list[float]]:
        """What the selector kept in this mini-batch, as [sum, count] pairs pooled like the losses."""
        mask = mb.response_mask.float()
        sel = (mb.token_weights > 0).float() * mask
        stats = {
            "train/entropy_selected": _stat_pair(mb.entropy, sel),
            "selector/kept_frac": [float(sel.sum()), float(mask.sum())],
        }
        for k, v in self.selector.metrics.items():
            if k != "kept_frac":  # the module's own, pooled over ranks
                stats[f"selector/{k}"] = _stat_pair(v, mask)
        self.selector.metrics.clear()
        return stats

    # ---- validation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_examples(self, examples: list[Any]) -> None:
        """Greedy accuracy and pass@k (unbiased) on examples that have a reference answer.

        Sampling runs on a forked RNG seeded from (seed, step), so validation never shifts the
        training stream and a resumed run draws exactly what an uninterrupted one draws.
        """
        examples = [e for e in examples if e.answer is not None]
        if not examples:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.rl_step)
            self._evaluate(examples)

    def _evaluate(self, examples: list[Any]) -> None:
        lg = self.cfg.logging
        prompts = [e.prompt for e in examples]
        refs = [e.answer for e in examples]
        greedy = self.sampler.generate(self.policy, self.tokenizer, prompts, 1, temperature=0.0)
        self.score(greedy, refs, self.val_reward_fn)
        correct = torch.tensor(
            [bool(i.get("correct", r > 0)) for i, r in zip(greedy.info, greedy.rewards)],
            dtype=torch.float32,
            device=greedy.rewards.device,
        )
        self.val_acc.update(correct, torch.ones_like(correct))
        sampled = self.sampler.generate(
            self.policy, self.tokenizer, prompts, lg.val_samples, temperature=lg.val_temperature
        )
        self.score(sampled, [refs[i // lg.val_samples] for i in range(sampled.size)], self.val_reward_fn)
        ok = torch.tensor(
            [bool(i.get("correct", r > 0)) for i, r in zip(sampled.info, sampled.rewards)],
            device=sampled.rewards.device,
        )
        self.val_passk.update(ok, sampled.group_ids)

    def validation_step(self, data: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_examples(data["examples"])

    def on_validation_epoch_end(self) -> None:
        self._log_validation()

    def _log_validation(self) -> None:
        """Validation metrics, synced over ranks, logged against the number of completed RL steps
        (Lightning's own step counter would put a post-update evaluation at the previous step)."""
        acc = self.val_acc.compute()
        passk = self.val_passk.compute()
        self.val_acc.reset()
        self.val_passk.reset()
        values = {"val/acc": float(acc), **{f"val/{k}": float(v) for k, v in passk.items()}}
        self.last_validation = values
        for lg in self.loggers:
            lg.log_metrics(values, step=self.rl_step)
            lg.save()
        if self._trainer is not None and not self.trainer.sanity_checking:
            self.log("val/acc", acc, prog_bar=True, logger=False)

    def on_train_start(self) -> None:
        # the step-0 baseline of validation accuracy, before any update
        if self.rl_step == 0 and self.trainer.datamodule is not None:
            for data in self.trainer.datamodule.val_dataloader():
                self.evaluate_examples(data["examples"])
            self._log_validation()

    # ---- checkpoint state ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_entropy"] = {
            "rl_step": self.rl_step,
            "components": {s: c.state_dict() for s, c in self._components().items()},
            "rng": _rng_state(),
            "config": saved_container(self.cfg),  # ${oc.env:...} kept unresolved (secrets)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["lightning_entropy"]
        self.rl_step = int(state["rl_step"])
        for s, c in self._components().items():
            c.load_state_dict(state["components"].get(s, {}))
        _set_rng_state(state["rng"])

    def _components(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "reward": self.reward_fn,
            "advantage": self.advantage_fn,
            "selector": self.selector,
            "loss": self.policy_loss,
            "regularizer": self.regularizer,
        }


def _rng_state() -> dict[str, Any]:
    """RNG streams as tensors and plain Python values, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(py_state), gauss],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = rng["python"]
    random.setstate((version, tuple(py_state), gauss))
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


TASK_REWARDS = {"arithmetic": "exact_match", "countdown": "countdown"}


LOSS_KEYS = {"train/pg_loss", "train/reg_loss", "train/kl_ref"}


def _stat_pair(v: Any, mask: Tensor) -> list[float]:
    """[sum, count] of a component stat: a [B, T] tensor over the masked tokens, a scalar as one value."""
    if isinstance(v, Tensor):
        v = v.detach().float()
        if v.dim() >= 2 and v.shape == mask.shape:
            return [float((torch.where(mask > 0, v, 0.0) * mask).sum()), float(mask.sum())]
        return [float(v.mean()), 1.0]
    return [float(v), 1.0]


def _add_stats(total: dict[str, list[float]], new: dict[str, list[float]]) -> None:
    for k, (s, c) in new.items():
        acc = total.setdefault(k, [0.0, 0.0])
        acc[0] += s
        acc[1] += c


def _reduce_stats(sums: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """sum / count per key after summing both over ranks (never an average of per-rank averages).
    A loss sum over ranks is (world size x the mini-batch loss), matched by its count of one per
    mini-batch per rank."""
    keys = sorted(sums)
    if is_distributed():  # a component may emit a key on one rank only: agree on the union first
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, keys)
        keys = sorted(set().union(*gathered))
    if not keys:
        return {}
    t = all_reduce_sum(
        torch.tensor([sums.get(k, [0.0, 0.0]) for k in keys], dtype=torch.float64, device=device)
    )
    return {k: s / c for k, (s, c) in zip(keys, t.tolist()) if c > 0}


__all__ = ["RLVRModule", "kl_penalty"]

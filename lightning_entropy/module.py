"""The LightningModule: one training_step is one RL step, read top to bottom as

    rollout (sample -> score -> old-policy pass -> advantages)  -> update (PPO epochs x mini-batches
    x micro-batches)  -> statistics (one MetricBank, pooled over micro-batches and ranks) -> log.

The maths lives in the stages (``rollout.py``, ``update.py``, ``forward.py``) and the components;
this class wires them to Lightning: the policy built in ``configure_model`` (so sharded strategies
can wrap it at init), manual optimisation, validation, and the checkpointed RL state.
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from lightning_entropy import rollout as R
from lightning_entropy.config import COMPONENT_SECTIONS, build_component, saved_container
from lightning_entropy.diagnostics import Diagnostics
from lightning_entropy.export import drop_reference_weights, restore_reference_weights
from lightning_entropy.forward import PolicyForward
from lightning_entropy.health import HealthMonitor
from lightning_entropy.metrics import MetricBank, PassAtK, PhaseTimer, SumRatio
from lightning_entropy.models import load_policy, load_tokenizer
from lightning_entropy.rng import gathered_rng_states, restore_rank_rng, seed_rank_stream
from lightning_entropy.strategies import gathered_for_generation, shard_model
from lightning_entropy.update import PolicyUpdate, UpdateSchedule, build_optimizer, warn_if_clipping_is_inert


class RLVRModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, policy_path: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.policy_path = str(policy_path)
        # the six components, keyed by their config section
        self.components: dict[str, Any] = {s: build_component(cfg, s) for s in COMPONENT_SECTIONS}
        c, a = self.components, cfg.algo
        self.group_size = int(cfg.sampler.get("group_size", 1))
        self.tokenizer = load_tokenizer(self.policy_path)
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        self.rl_step = 0
        self.last_rollout: Any = None  # read by loggers.SampleTable after the step
        self.last_step_stats: dict[str, float] = {}
        self.last_validation: dict[str, float] = {}
        self.val_reward = R.validation_reward(c["reward"], cfg.logging.get("val_reward"), cfg.data.task)
        temperature = a.temperature if a.temperature is not None else float(getattr(c["sampler"], "temperature", 1.0) or 1.0)
        self.forward_cfg = PolicyForward(temperature, a.chunk_size, a.logits_from_hidden, a.micro_batch_size)
        max_new = int(getattr(c["sampler"], "max_new_tokens", 0) or 0)
        self.rollout_stage = R.RolloutStage(
            c,
            self.tokenizer,
            self.forward_cfg,
            self.group_size,
            self.skips_old_pass,
            self.uses_ref,
            strict_rewards=bool(cfg.reward.get("strict", False)),
            dynamic_sampling=a.dynamic_sampling,
            max_sampling_rounds=a.max_sampling_rounds,
            overlong=(max_new, a.overlong_buffer, a.overlong_penalty) if a.overlong_buffer else None,
        )
        self.update_stage = PolicyUpdate(
            c,
            self.forward_cfg,
            UpdateSchedule(a.ppo_epochs, a.mini_batch_size, a.shuffle_minibatches, cfg.seed),
            agg_mode=c["loss"].agg_override or cfg.loss.get("agg", "token-mean"),
            const=max_new or None,
            kl_coef=a.kl_coef,
            kl_type=a.kl_type,
            grad_clip=cfg.optim.grad_clip,
            drop_truncated=a.overlong_filter,
            rollout_correction=(a.rollout_correction, a.rollout_correction_cap),
        )
        self.health = HealthMonitor(**OmegaConf.to_container(cfg.health), warn=rank_zero_warn)
        self.stats, self.val_stats = MetricBank(), MetricBank()
        self.diagnostics = Diagnostics(cfg.diagnostics, self.forward_cfg)

    # ---- model and optimizer ---------------------------------------------------------------
    @property
    def uses_ref(self) -> bool:
        return self.cfg.algo.kl_coef > 0 or any("ref_logprobs" in c.requires for c in self.components.values())

    @property
    def rollout_size(self) -> int:
        return self.cfg.data.prompts_per_step * self.group_size

    @property
    def updates_per_step(self) -> int:
        per_epoch = self.rollout_size // (self.cfg.algo.mini_batch_size or self.rollout_size)
        return self.cfg.algo.ppo_epochs * per_epoch

    @property
    def skips_old_pass(self) -> bool:
        """Every update is on-policy and no component reads pi_old before the first forward."""
        return (
            self.cfg.algo.get("skip_old_pass", True)
            and self.updates_per_step == 1
            and not any(c.needs_old_pass for c in self.components.values())
            and not self.components["reward"].needs_policy_stats
            and self.cfg.algo.rollout_correction != "mis"  # masks tokens before the first forward
        )

    def setup(self, stage: str) -> None:
        seed_rank_stream(self.cfg.seed, self.global_rank)  # each rank samples from its own stream
        if stage == "fit":
            warn_if_clipping_is_inert(self.components["loss"], self.updates_per_step)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        m = self.cfg.model
        self.policy = load_policy(
            self.policy_path,
            dtype=m.dtype,
            gradient_checkpointing=m.gradient_checkpointing,
            no_dropout=m.get("disable_dropout", True),
        )
        self.policy.train()  # from_pretrained returns eval mode; log-prob passes switch to eval themselves
        if self.uses_ref:
            self.ref_policy = load_policy(self.policy_path, dtype=m.dtype)  # frozen, eval: no dropout
            self.ref_policy.requires_grad_(False).eval()
        mesh = getattr(self, "_device_mesh", None)  # set by the fsdp2 strategy (strategies.FSDP2Strategy)
        if mesh is not None:
            for model in (self.policy, self.ref_policy):
                if model is not None:
                    shard_model(model, mesh["data_parallel"])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt, sched = build_optimizer(params, self.cfg.optim, self.cfg.trainer.max_steps * self.updates_per_step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- one RL step -----------------------------------------------------------------------
    def training_step(self, data: dict[str, Any], batch_idx: int) -> None:
        timer, t0 = PhaseTimer(), time.perf_counter()
        dm = self.trainer.datamodule
        extra = partial(_extra_examples, dm, self.rl_step, self.global_rank)
        with gathered_for_generation(self.policy):  # sharded policies: gathered once, not per token
            batch = self.rollout_stage(
                self.policy, self.ref_policy, data["examples"], int(data["group_offset"]), timer, extra
            )
        self.diagnostics.before_update(self.policy, batch, self.rl_step)
        with timer("update"):
            self.update_stage.run(
                batch,
                self.rl_step,
                self.rollout_size,
                self.policy,
                self.optimizers(),
                self.lr_schedulers(),
                self.manual_backward,
                self.stats,
            )
        with timer("sync"):  # an engine-backed sampler loads the updated weights
            self.components["sampler"].after_update(self.policy, self.rl_step)
        R.record_rollout(self.stats, batch, self.components)  # after the update: pi_old may come from it
        self.components["sampler"].observe(batch)
        self.diagnostics.after_update(self.policy, batch, self.stats)
        self.last_rollout = batch
        timer.seconds["step"] = time.perf_counter() - t0
        summary = self._log_step(timer, batch)
        self.rl_step += 1
        for comp in self.components.values():
            comp.end_step(summary)
        if hasattr(dm, "mark_consumed"):
            dm.mark_consumed(int(data["index"]))

    def _log_step(self, timer: PhaseTimer, batch: Any) -> dict[str, float]:
        for phase in ("generate", "score", "old_pass", "update", "sync", "step"):  # means over ranks
            self.stats.update(f"time/{phase}", timer.seconds.get(phase, 0.0), 1.0, kind=SumRatio)
        # generated tokens per second of the whole step, per rank
        speed = float(batch.response_mask.sum()) / max(timer.seconds["step"], 1e-9)
        self.stats.update("time/tokens_per_s", speed, 1.0, kind=SumRatio)
        values = {k: float(v) for k, v in self.stats.compute(self.device).items()}
        values["train/lr"] = self.lr_schedulers().get_last_lr()[0]
        values["train/rl_step"] = float(self.rl_step)
        values.update(self.diagnostics.step_values(self.rl_step, values))
        # one call per logger, against the RL step: Lightning's self.log costs ~1 ms a key (50 keys:
        # 6% of a tiny step); it only feeds the progress bar
        for lg in self.loggers:
            lg.log_metrics(values, step=self.rl_step)
        for k in ("train/reward", "train/entropy"):
            self.log(k, values[k], prog_bar=True, logger=False)
        self.health.check(self.rl_step, values, self.updates_per_step)
        self.last_step_stats = values
        return values

    # ---- validation ------------------------------------------------------------------------
    def evaluate_examples(self, examples: list[Any]) -> None:
        """Greedy accuracy and pass@k on examples with a reference answer, sampled on a forked RNG
        seeded from (seed, step), so validation never shifts the training stream and a resumed run
        draws exactly what an uninterrupted one draws."""
        examples = [e for e in examples if e.answer is not None]
        if not examples:
            return
        lg = self.cfg.logging
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), gathered_for_generation(self.policy):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.rl_step)
            drawn, correct = R.evaluate(
                self.components["sampler"], self.policy, self.tokenizer, examples, self.val_reward,
                lg.val_samples, lg.val_temperature, self.val_stats,
                partial(PassAtK, ks=self.diagnostics.pass_ks(list(lg.pass_k), lg.val_samples)),
            )
        self.diagnostics.on_validation(self.policy, drawn, correct, self.rl_step, self.val_stats)

    def validation_step(self, data: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_examples(data["examples"])

    def on_validation_epoch_end(self) -> None:
        self._log_validation()

    def _log_validation(self) -> None:
        """Validation metrics, pooled over ranks, logged against the number of completed RL steps
        (Lightning's own step counter would put a post-update evaluation at the previous step)."""
        values = {k: float(v) for k, v in self.val_stats.compute(self.device).items()}
        if not values:
            return
        self.last_validation = values
        self.diagnostics.validation_values(self.rl_step, values)
        for lg in self.loggers:
            lg.log_metrics(values, step=self.rl_step)
            lg.save()
        if self._trainer is not None and not self.trainer.sanity_checking:
            self.log("val/acc", values["val/acc"], prog_bar=True, logger=False)

    def on_train_start(self) -> None:
        # the step-0 baseline of validation accuracy, before any update
        if self.rl_step == 0 and self.trainer.datamodule is not None:
            for data in self.trainer.datamodule.val_dataloader():
                self.evaluate_examples(data["examples"])
            self._log_validation()

    def teardown(self, stage: str) -> None:
        self.components["sampler"].close()  # an inference engine and the process state it set up

    # ---- checkpoint state ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in self.policy.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never leave a poisoned checkpoint to resume from
            raise RuntimeError(f"refusing to write a checkpoint: {len(bad)} policy tensors are non-finite ({bad[0]}, ...)")
        checkpoint["lightning_entropy"] = {
            "rl_step": self.rl_step,
            "health": self.health.state_dict(),
            "components": {s: c.state_dict() for s, c in self.components.items()},
            "diagnostics": self.diagnostics.state_dict(),
            "rng_by_rank": gathered_rng_states(),  # each rank resumes its own sampling stream
            "config": saved_container(self.cfg),  # ${oc.env:...} kept unresolved (secrets)
        }
        drop_reference_weights(checkpoint)  # rebuilt from its path on resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_reference_weights(checkpoint, self.ref_policy)
        state = checkpoint["lightning_entropy"]
        self.rl_step = int(state["rl_step"])
        self.health.load_state_dict(state.get("health", {}))
        for s, c in self.components.items():
            c.load_state_dict(state["components"].get(s, {}))
        self.diagnostics.load_state_dict(state.get("diagnostics", {}))
        states = state.get("rng_by_rank") or [state["rng"]]  # older checkpoints: rank 0's state only
        if not restore_rank_rng(states, self.global_rank, self.cfg.seed, self.rl_step):
            warnings.warn(
                f"rank {self.global_rank}: the checkpoint holds the RNG states of {len(states)} rank(s); "
                "this rank starts a new sampling stream (the resume is not bit-exact)",
                stacklevel=2,
            )


def _extra_examples(dm: Any, step: int, rank: int, round_: int, n: int) -> list[Any]:
    if dm is None or not hasattr(dm, "extra_examples"):
        raise RuntimeError("algo.dynamic_sampling needs a data module that can draw extra prompts")
    return dm.extra_examples(step, round_, n, rank)


__all__ = ["RLVRModule"]

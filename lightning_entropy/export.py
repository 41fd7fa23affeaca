"""The trained policy out as a Hugging Face folder, and checkpoints without the reference model.

A run directory keeps ``policy_config/`` (the policy's config.json, generation_config.json and
tokenizer, no weights) from the start, so ``export`` rebuilds the architecture from the run itself,
without the original model path or the tiny-policy cache; only ``policy.*`` weights come from the
checkpoint. The frozen reference model is never written into checkpoints: it is rebuilt from its
path when a run resumes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

POLICY_PREFIX = "policy."
REF_PREFIX = "ref_policy."
POLICY_CONFIG = "policy_config"
TOKENIZER_FILES_HINT = "tokenizer.json / tokenizer_config.json"


class ExportError(ValueError):
    """A checkpoint or run directory that cannot be exported; the message names the path."""


def drop_reference_weights(checkpoint: dict[str, Any]) -> None:
    """Remove the frozen reference model from a checkpoint being saved (it doubles the file)."""
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith(REF_PREFIX)]:
        del state[key]


def restore_reference_weights(checkpoint: dict[str, Any], ref_policy: torch.nn.Module | None) -> None:
    """Before a checkpoint loads (strictly), put back the reference weights just rebuilt from its path."""
    if ref_policy is None:
        return
    state = checkpoint.setdefault("state_dict", {})
    for key, value in ref_policy.state_dict().items():
        state.setdefault(REF_PREFIX + key, value)


def save_policy_config(policy_path: str | Path, out: Path) -> None:
    """config.json, generation_config.json and tokenizer of the policy (no weights) into ``out``."""
    from transformers import AutoConfig, GenerationConfig

    from lightning_entropy.models import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(str(policy_path)).save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(str(policy_path)).save_pretrained(out)
    except OSError:  # many checkpoints ship no generation_config.json
        pass
    load_tokenizer(policy_path).save_pretrained(out)


def save_policy(policy: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    """``save_pretrained`` of the policy and tokenizer into ``out`` (written beside, then renamed,
    so a crash never leaves a half-written folder under the final name)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def find_checkpoint(source: Path) -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/last.ckpt``."""
    if source.is_file():
        return source
    if source.is_dir():
        ckpt = source / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            return ckpt
        raise ExportError(f"{source}: a folder without checkpoints/last.ckpt (not a run directory)")
    raise ExportError(f"{source}: no such checkpoint or run directory")


def export_checkpoint(source: Path, out: Path) -> Path:
    """A checkpoint (or run directory) -> ``out``, a folder ``AutoModelForCausalLM`` and vLLM load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = find_checkpoint(source)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose a new output folder")
    base = ckpt.parent.parent / POLICY_CONFIG
    if not (base / "config.json").is_file():
        raise ExportError(
            f"{base}: missing (run directories written before `export` existed lack it); the run's "
            "final/ folder, if any, already holds the policy"
        )
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(f"{ckpt}: cannot load checkpoint: {str(err).splitlines()[0]}") from err
    state = {
        k[len(POLICY_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(POLICY_PREFIX)
    }
    if not state:
        raise ExportError(f"{ckpt}: no policy.* weights in the checkpoint")
    config = AutoConfig.from_pretrained(str(base))
    dtype = next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(
            f"{ckpt}: weights do not match {base}/config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(base))
    except OSError:
        pass
    return save_policy(model, AutoTokenizer.from_pretrained(str(base)), out)

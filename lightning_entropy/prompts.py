"""Prompt formatting and encoding: one place decides the exact tokens a prompt becomes.

The DataModule formats every prompt once (template, system prompt, chat template) and measures it
with ``encode_prompt``; the sampler encodes with the same function, so the length filter and the
rollout see the same token ids.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import torch

Message = dict[str, str]
CHAT_CHOICES = ("auto", True, False)


class DataError(ValueError):
    """A data file, key or value that cannot work; the message names the file, line and key."""


def chat_choice(value: Any) -> str | bool:
    """``data.chat_template`` from YAML or the command line (``true``/``"true"``/``auto``...)."""
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        value = {"auto": "auto", "true": True, "false": False}[value.lower()]
    if value not in CHAT_CHOICES or (value == "auto" and not isinstance(value, str)):
        raise DataError(f"data.chat_template={value!r} must be one of auto, true, false")
    return value


def check_template(template: str | None) -> None:
    """A template must mention ``{prompt}`` and nothing else (literal braces are written ``{{ }}``)."""
    if template is None:
        return
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise DataError(f"data.template={template!r}: {err} (write literal braces as {{{{ and }}}})") from err
    if fields != ["prompt"]:
        raise DataError(
            f"data.template={template!r} must contain the field {{prompt}} exactly once and no other "
            f"field (found {fields}); write literal braces as {{{{ and }}}}, e.g. \\\\boxed{{{{}}}}"
        )


def messages_of(value: Any) -> list[Message] | None:
    """The value as a list of chat messages, or None if it is not one."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value):
        return [{"role": m["role"], "content": str(m["content"])} for m in value]
    return None


def plain_text(messages: list[Message]) -> str:
    """Messages as plain text for a model without a chat template: the contents, blank-line separated."""
    return "\n\n".join(m["content"] for m in messages)


@dataclass(frozen=True)
class PromptFormat:
    """``template`` wraps the user's text (the last user message of a chat prompt); ``system_prompt``
    is added as a system message unless the prompt has one; ``chat_template`` (auto: when the
    tokenizer has one) renders the messages with ``add_generation_prompt``, else they are joined
    as plain text."""

    template: str | None = None
    chat_template: str | bool = "auto"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        check_template(self.template)
        object.__setattr__(self, "chat_template", chat_choice(self.chat_template))

    @property
    def is_identity(self) -> bool:
        return self.template is None and self.system_prompt is None and self.chat_template is not True

    def uses_chat(self, tokenizer: Any) -> bool:
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template is True and not has:
            raise DataError(
                "data.chat_template=true but the tokenizer has no chat template; use auto or false"
            )
        return has if self.chat_template == "auto" else bool(self.chat_template)

    def render(self, prompt: str, messages: list[Message] | None, tokenizer: Any) -> str:
        msgs = [dict(m) for m in (messages or [{"role": "user", "content": prompt}])]
        if self.template is not None:
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if users:
                msgs[users[-1]]["content"] = self.template.format(prompt=msgs[users[-1]]["content"])
        if self.system_prompt is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        if self.uses_chat(tokenizer):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return plain_text(msgs)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one prompt with the special tokens the tokenizer adds itself (a Llama BOS), unless
    the text already starts with them (a rendered chat template writes its own BOS)."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def encode_prompts(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask of a batch of prompts (``encode_prompt`` row by row)."""
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(1, max(len(r) for r in rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask

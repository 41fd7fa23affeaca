"""The plug-in surface: one registry per component family.

Every family below is filled by the modules of ``lightning_entropy.components``; a user adds a
member with ``@register(family, name)`` in their own file and loads it with ``imports:`` in YAML
or ``--import`` on the command line.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_entropy.components.base import (
    AdvantageEstimator,
    EntropyRegularizer,
    PolicyLoss,
    Reward,
    Sampler,
    TokenSelector,
)


class RegistryError(ValueError):
    """A name or hyperparameter that the registry cannot resolve."""


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    annotation: str


class Registry:
    """Name -> class map for one component family.

    ``base`` is the protocol class every member must subclass, so a sampler cannot be registered
    as a loss by mistake.
    """

    def __init__(self, family: str, base: type, doc: str) -> None:
        self.family = family
        self.base = base
        self.doc = doc
        self._entries: dict[str, type] = {}

    def register(self, name: str, override: bool = False) -> Callable[[type], type]:
        def wrap(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise RegistryError(
                    f"cannot register {cls!r} as {self.family} '{name}': it must subclass "
                    f"{self.base.__module__}.{self.base.__name__}"
                )
            if name in self._entries and not override and self._entries[name] is not cls:
                raise RegistryError(
                    f"{self.family} '{name}' is already registered by "
                    f"{self._entries[name].__module__}.{self._entries[name].__qualname__}; "
                    "pass override=True to replace it on purpose"
                )
            self._entries[name] = cls
            cls.registry_name = name
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, key: str | None = None) -> type:
        if name not in self._entries:
            where = f" (config key '{key}')" if key else ""
            close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RegistryError(
                f"unknown {self.family} '{name}'{where}. Registered {self.family} names: "
                f"{', '.join(self.names())}{hint}"
            )
        return self._entries[name]

    def params(self, name: str) -> list[Param]:
        return signature_params(self.get(name))

    def check_kwargs(self, name: str, kwargs: dict[str, Any], key: str | None = None) -> None:
        accepted = {p.name: p for p in signature_params(self.get(name, key))}
        for k in kwargs:
            if k not in accepted:
                close = difflib.get_close_matches(k, list(accepted), n=1, cutoff=0.5)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                listing = ", ".join(f"{p.name}={p.default!r}" for p in accepted.values()) or "none"
                where = f"{key}.{k}" if key else k
                raise RegistryError(
                    f"unknown hyperparameter '{where}' for {self.family} '{name}'.{hint} Accepted: {listing}"
                )

    def build(self, name: str, kwargs: dict[str, Any] | None = None, key: str | None = None) -> Any:
        kwargs = dict(kwargs or {})
        self.check_kwargs(name, kwargs, key)
        try:
            return self.get(name, key)(**kwargs)
        except (TypeError, ValueError) as err:
            where = key or self.family
            raise RegistryError(f"{where}: cannot build {self.family} '{name}': {err}") from err


def signature_params(cls: type) -> list[Param]:
    """Keyword hyperparameters of a component, read from its ``__init__`` signature."""
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        out.append(Param(p.name, default, str(ann)))
    return out


# Rollout generation: ``generate(model, tokenizer, prompts, group_size) -> RolloutBatch``.
SAMPLERS = Registry("sampler", Sampler, "generate(model, tokenizer, prompts, group_size) -> RolloutBatch")
# Sequence rewards: ``__call__(prompts, completions, references) -> (Tensor[B], infos)``.
REWARDS = Registry("reward", Reward, "__call__(prompts, completions, references) -> (rewards[B], infos)")
# Advantage estimators: ``__call__(batch) -> Tensor[B, T]``.
ADVANTAGES = Registry("advantage", AdvantageEstimator, "__call__(batch) -> advantages[B, T]")
# Token selectors: ``__call__(batch) -> Tensor[B, T]`` of non-negative weights.
SELECTORS = Registry("selector", TokenSelector, "__call__(batch) -> token_weights[B, T]")
# Policy losses / clippers: ``__call__(logprobs, batch, entropy) -> (loss[B, T], stats)``.
LOSSES = Registry("loss", PolicyLoss, "__call__(logprobs, batch, entropy) -> (per-token loss[B, T], stats)")
# Entropy regularizers / controllers: ``__call__(logits, logprobs, entropy, batch, step)``.
REGULARIZERS = Registry(
    "regularizer", EntropyRegularizer, "__call__(logits, logprobs, entropy, batch, step) -> (loss, stats)"
)

FAMILIES: dict[str, Registry] = {
    r.family: r for r in (SAMPLERS, REWARDS, ADVANTAGES, SELECTORS, LOSSES, REGULARIZERS)
}


def register(family: str, name: str, override: bool = False) -> Callable[[type], type]:
    """Class decorator: ``@register("advantage", "my_baseline")``."""
    if family not in FAMILIES:
        close = difflib.get_close_matches(family, list(FAMILIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RegistryError(f"unknown family '{family}'. Families: {', '.join(FAMILIES)}{hint}")
    return FAMILIES[family].register(name, override=override)

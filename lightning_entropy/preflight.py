"""Checks that must pass before a run directory is created or a model is loaded.

Each raises :class:`ConfigError` with one line naming the key and the value: the trainer's strategy,
precision, accelerator and devices (against Lightning's own registries), the task's difficulty and
options, the model path (a local-looking path that does not exist is reported as a missing path,
not passed on as a hub id), and run names (no path separators, no ``..``, no ``${oc.env:...}``).
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_entropy.config import ConfigError

ACCELERATOR_ALIASES = ("auto", "gpu")


def check_config(cfg: DictConfig) -> None:
    """Everything here is cheap and machine-independent (a sweep checks it on a login node)."""
    check_run_name(cfg)
    check_trainer(cfg)
    check_task(cfg)
    check_model_path(cfg)


# ---- names -------------------------------------------------------------------------------------


def check_run_name(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg.logging, resolve=False).get("name")
    if isinstance(raw, str) and "oc.env" in raw:
        raise ConfigError(
            f"logging.name={raw!r}: environment variables are not allowed in run names "
            "(the name becomes a directory and is printed and logged); pass the name itself"
        )
    name = cfg.logging.name
    if name is None:
        return
    name = str(name)
    if not name.strip() or name in (".", "..") or any(c in name for c in ("/", "\\", os.sep, "\0")):
        raise ConfigError(
            f"logging.name={name!r}: a run name is one directory under logging.root: not empty, "
            "'.' or '..', and no path separators (set logging.root to choose where runs go)"
        )


# ---- trainer -----------------------------------------------------------------------------------


def _literals(tp: Any) -> set[Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return set(args)
    return set().union(*(_literals(a) for a in args)) if args else set()


def precision_names() -> list[Any]:
    from lightning.fabric.connector import _PRECISION_INPUT

    return sorted(_literals(_PRECISION_INPUT), key=str)


def strategy_names() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_entropy.strategies import FSDP2

    return ["auto", *StrategyRegistry.available_strategies(), FSDP2]


def accelerator_names() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return [*ACCELERATOR_ALIASES, *sorted(AcceleratorRegistry.available_accelerators())]


def _closest(value: str, names: list[Any]) -> str:
    import difflib

    m = difflib.get_close_matches(str(value), [str(n) for n in names], n=1)
    return f"; did you mean '{m[0]}'?" if m else ""


def check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    if isinstance(t.strategy, str) and t.strategy not in (names := strategy_names()):
        raise ConfigError(
            f"trainer.strategy={t.strategy!r} is not a Lightning strategy{_closest(t.strategy, names)} "
            f"(registered: {', '.join(names)})"
        )
    from lightning_entropy.strategies import strategy_error

    if t.accelerator == "cpu" and (why := strategy_error(t.strategy, t.accelerator, cuda=False)):
        raise ConfigError(why)
    precisions = precision_names()
    if t.precision not in precisions:
        raise ConfigError(
            f"trainer.precision={t.precision!r} is not a Lightning precision"
            f"{_closest(t.precision, precisions)} (one of: {', '.join(sorted({str(p) for p in precisions}))})"
        )
    accel = t.accelerator
    if isinstance(accel, str) and accel not in (names := accelerator_names()):
        raise ConfigError(
            f"trainer.accelerator={accel!r} is not a Lightning accelerator{_closest(accel, names)} "
            f"(one of: {', '.join(names)})"
        )
    check_devices(t.devices)
    if not isinstance(t.num_nodes, int) or t.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={t.num_nodes!r}: must be an integer >= 1")


def check_devices(devices: Any) -> None:
    bad = ConfigError(
        f"trainer.devices={devices!r}: must be a count >= 1, -1 (all), 'auto', or a non-empty list "
        "of device indices"
    )
    if isinstance(devices, bool):
        raise bad
    if isinstance(devices, int):
        if devices == 0 or devices < -1:
            raise bad
        return
    if isinstance(devices, str):
        s = devices.strip()
        if s == "auto":
            return
        parts = [p for p in s.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise bad from None
        if not values or (len(values) == 1 and "," not in s and (values[0] == 0 or values[0] < -1)):
            raise bad
        return
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        if len(devices) == 0 or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in devices):
            raise bad
        return
    raise bad


def _requested_count(devices: Any) -> int | None:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return max(devices) + 1
    return None


def check_accelerator_available(cfg: DictConfig) -> None:
    """Machine-dependent: the accelerator exists here and has the requested devices (fit/validate only;
    a sweep for a GPU cluster is checked on a login node without one)."""
    import torch

    from lightning_entropy.strategies import strategy_error

    t = cfg.trainer
    accel = t.accelerator
    if why := strategy_error(t.strategy, accel, cuda=torch.cuda.is_available()):
        raise ConfigError(why)
    if not isinstance(accel, str) or accel in ("auto", "cpu"):
        return
    if accel in ("gpu", "cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 and accel == "gpu" and torch.backends.mps.is_available():
            return
        if n == 0:
            raise ConfigError(
                f"trainer.accelerator={accel}: no CUDA GPU is visible on this machine "
                "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto"
            )
        want = _requested_count(t.devices)
        if want is not None and want > n:
            raise ConfigError(f"trainer.devices={t.devices!r}: only {n} CUDA GPU(s) visible on this machine")
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    cls = AcceleratorRegistry[accel]["accelerator"]
    if not cls.is_available():
        raise ConfigError(f"trainer.accelerator={accel}: not available on this machine")


# ---- data and model ------------------------------------------------------------------------------


def check_task(cfg: DictConfig) -> None:
    """A built-in task is built (cheap) so that a bad difficulty or option fails here."""
    d = cfg.data
    if d.path is not None or d.task is None:
        return
    from lightning_entropy.data import TASKS, make_task

    if d.task not in TASKS:
        return  # config.validate reports it
    options = OmegaConf.to_container(d.options, resolve=True) if OmegaConf.is_config(d.options) else d.options
    try:
        make_task(d.task, d.difficulty, **dict(options or {}))
    except (ValueError, TypeError) as err:
        msg = str(err).splitlines()[0]
        key = f"data.difficulty={d.difficulty}" if msg.startswith("difficulty") else f"data.options={options}"
        raise ConfigError(f"{key} (data.task={d.task}): {msg}") from err


def looks_local(name: str) -> bool:
    """./x, ../x, /x, ~/x (and Windows drive paths): meant as a directory, never a hub id."""
    return name.startswith((".", "/", "~", "\\")) or (len(name) > 2 and name[1] == ":" and name[2] in "/\\")


def check_model_path(cfg: DictConfig) -> None:
    from lightning_entropy.models import BUILTIN_PREFIX

    name = str(cfg.model.name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        return
    path = Path(os.path.expanduser(name))
    if not path.exists():
        if looks_local(name):
            raise ConfigError(f"model.name_or_path={name}: no such directory")
        return  # a hub id; resolved by from_pretrained where there is network
    if not path.is_dir():
        raise ConfigError(
            f"model.name_or_path={name}: is a file; expected a model directory with config.json"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={name}: directory has no config.json (not a HF checkpoint)")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model.name_or_path={name}: config.json does not load: {first}") from err
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ConfigError(
            f"model.name_or_path={name}: model_type '{config.model_type}' is not a causal LM "
            "(AutoModelForCausalLM cannot load it)"
        )


__all__ = [
    "check_accelerator_available",
    "check_config",
    "check_devices",
    "check_model_path",
    "check_run_name",
    "check_task",
    "check_trainer",
    "looks_local",
]

"""Structured config: defaults, YAML + dot-list overrides + user imports, and validation.

Everything that can be checked without a model is checked here, so a bad name, key or value fails
in seconds with the file, key and value at fault, before any model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_entropy.batch import AGG_MODES
from lightning_entropy.registry import FAMILIES, RegistryError


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the value."""


@dataclass
class TinyConfig:
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 576
    max_positions: int = 64
    seed: int = 0
    warmstart_steps: int = 375
    warmstart_lr: float = 2e-3
    warmstart_batch_size: int = 64
    warmstart_examples: int = 5000


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny"  # or any local/hub `from_pretrained` path
    dtype: str = "float32"  # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class DataConfig:
    task: str | None = "arithmetic"  # built-in task, or null when `path` is set
    path: str | None = None  # JSONL / Parquet file, or hf:<name>[:<split>]
    val_path: str | None = None
    difficulty: int = 2  # arithmetic: digits per operand; countdown: how many numbers
    options: dict[str, Any] = field(default_factory=lambda: {"reverse_answer": True})  # task options
    train_size: int = 5000
    val_size: int = 128
    prompt_key: str = "prompt"
    answer_key: str | None = "answer"
    prompts_per_step: int = 32  # global, across ranks
    seed: int = 0  # splits, prompt order and the tiny policy's warm-start; `seed` drives the RL run
    val_batch_size: int = 64


@dataclass
class AlgoConfig:
    ppo_epochs: int = 1
    mini_batch_size: int | None = 128  # sequences per optimizer step, global; null = whole rollout
    micro_batch_size: int | None = None  # sequences per forward on a rank; null = whole mini-batch
    shuffle_minibatches: bool = False
    kl_coef: float = 0.0
    kl_type: str = "k3"  # k1 | k2 | k3 estimator of KL(pi || pi_ref)
    temperature: float | None = None  # training temperature; null = the sampler's
    logits_from_hidden: bool = False  # training forward: log-probs/entropy from hidden states + LM head
    chunk_size: int = 256  # rows per chunk in log-prob/entropy ops (0.15 GiB fp32 at a 151k vocabulary)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-4  # 3e-4 already destabilises the tiny policy (reward falls within 5 steps)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    warmup_steps: int = 0  # optimizer steps
    schedule: str = "constant"  # constant | linear | cosine
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "32-true"
    max_steps: int = 100  # RL steps (each = one rollout and its updates)
    deterministic: bool = False


@dataclass
class LoggingConfig:
    root: str = "runs"
    name: str | None = None  # run directory under root; default: fit-<timestamp>
    val_every: int = 20  # RL steps between validations
    val_samples: int = 8  # samples per validation prompt for pass@k
    pass_k: list[int] = field(default_factory=lambda: [1, 4, 8])
    val_temperature: float = 1.0
    tensorboard: bool = False
    ckpt_every: int = 20  # RL steps between checkpoints (last.ckpt always kept)
    progress: bool = True
    plot: bool = True


def _component(name: str) -> Any:
    return field(default_factory=lambda: {"name": name})


@dataclass
class Config:
    seed: int = 0
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: dict[str, Any] = field(
        default_factory=lambda: {"name": "hf", "group_size": 8, "max_new_tokens": 8}
    )
    reward: dict[str, Any] = _component("exact_match")
    advantage: dict[str, Any] = _component("grpo")
    selector: dict[str, Any] = _component("all")
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "ppo", "agg": "token-mean"})
    regularizer: dict[str, Any] = _component("none")
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


COMPONENT_SECTIONS = ("sampler", "reward", "advantage", "selector", "loss", "regularizer")
FRAMEWORK_KEYS = {
    "loss": ("name", "agg"),
    "sampler": ("name", "group_size"),
}  # keys of a component section that are not hyperparameters


def component_kwargs(section: str, spec: dict[str, Any]) -> dict[str, Any]:
    skip = FRAMEWORK_KEYS.get(section, ("name",))
    return {k: v for k, v in spec.items() if k not in skip}


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, imports: list[str] | None = None
) -> DictConfig:
    """Default <- YAML file <- dot-list overrides, type-checked against the structured schema."""
    cfg = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as err:  # YAML syntax errors carry the line number
            raise ConfigError(f"{p}: cannot parse YAML: {err}") from err
        _check_top_level(p, layers[-1])
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key=value (e.g. optim.lr=1e-4)")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"bad override {overrides}: {err}") from err
    for i, layer in enumerate(layers):
        where = str(path) if (path is not None and i == 0) else "command-line override"
        # a component swapped by name drops the old one's hyperparameters
        for section in COMPONENT_SECTIONS:
            new = layer.get(section) if isinstance(layer, DictConfig) else None
            if isinstance(new, DictConfig) and "name" in new and new["name"] != cfg[section].get("name"):
                keep = {
                    k: cfg[section][k]
                    for k in FRAMEWORK_KEYS.get(section, ())
                    if k != "name" and k in cfg[section]
                }
                cfg[section] = {"name": new["name"], **keep}
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {_omegaconf_message(err)}") from err
    if imports:
        cfg.imports = list(cfg.imports) + list(imports)
    return cfg


def _check_top_level(path: Path, layer: Any) -> None:
    """A config file is a mapping of sections; a list or a scalar at the top is a mistake."""
    if not isinstance(layer, DictConfig):
        kind = "a list" if OmegaConf.is_list(layer) else type(layer).__name__
        raise ConfigError(
            f"{path}: the top level must be a mapping of config sections (model:, data:, ...), got {kind}"
        )


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def import_user_modules(paths: list[str], base: Path | None = None) -> None:
    """Import user files/modules so their ``@register`` decorators run."""
    for item in paths:
        candidate = Path(item) if Path(item).is_absolute() or base is None else base / item
        if item.endswith(".py") or candidate.suffix == ".py":
            file = candidate if candidate.is_file() else Path(item)
            if not file.is_file():
                raise ConfigError(f"imports: file not found: {item}")
            name = f"lightning_entropy_user_{file.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(item)
            except ImportError as err:
                raise ConfigError(f"imports: cannot import module '{item}': {err}") from err


def build_component(cfg: DictConfig, section: str) -> Any:
    spec = OmegaConf.to_container(cfg[section], resolve=True)
    if "name" not in spec:
        raise ConfigError(f"{section}: missing 'name'; registered: {', '.join(FAMILIES[section].names())}")
    return FAMILIES[section].build(spec["name"], component_kwargs(section, spec), key=section)


def validate(cfg: DictConfig, world_size: int | None = None) -> dict[str, Any]:
    """Check everything checkable before a model loads; returns the built components."""
    try:
        comps = {s: build_component(cfg, s) for s in COMPONENT_SECTIONS}
    except RegistryError as err:
        raise ConfigError(str(err)) from err
    agg = cfg.loss.get("agg", "token-mean")
    if agg not in AGG_MODES:
        raise ConfigError(f"loss.agg: '{agg}' is not one of {', '.join(AGG_MODES)}")
    a, d, t = cfg.algo, cfg.data, cfg.trainer
    ws = world_size or _world_size(t)
    group_size = cfg.sampler.get("group_size", 1)
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"sampler.group_size: must be an integer >= 1, got {group_size!r}")
    if group_size == 1 and cfg.advantage.name in GROUP_BASELINES:
        raise ConfigError(
            f"sampler.group_size=1 with advantage '{cfg.advantage.name}': a group baseline needs at least "
            "2 responses per prompt (every advantage would be the raw reward or 0)"
        )
    if a.ppo_epochs < 1:
        raise ConfigError(f"algo.ppo_epochs: must be >= 1, got {a.ppo_epochs}")
    if a.kl_type not in ("k1", "k2", "k3"):
        raise ConfigError(f"algo.kl_type: '{a.kl_type}' is not one of k1, k2, k3")
    if d.prompts_per_step < 1 or d.prompts_per_step % ws:
        raise ConfigError(
            f"data.prompts_per_step={d.prompts_per_step} must be a positive multiple of the "
            f"number of ranks ({ws})"
        )
    rollout = d.prompts_per_step * group_size
    mini = a.mini_batch_size or rollout
    if mini < 1 or rollout % mini:
        raise ConfigError(
            f"algo.mini_batch_size={a.mini_batch_size} must divide the rollout size "
            f"data.prompts_per_step x sampler.group_size = {rollout}"
        )
    if mini % ws:
        raise ConfigError(f"algo.mini_batch_size={mini} must be divisible by the number of ranks ({ws})")
    if a.micro_batch_size is not None and a.micro_batch_size < 1:
        raise ConfigError(f"algo.micro_batch_size: must be >= 1, got {a.micro_batch_size}")
    if t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps: must be >= 1 RL step, got {t.max_steps}")
    o = cfg.optim
    if o.name not in ("adamw", "adam", "sgd"):
        raise ConfigError(f"optim.name: '{o.name}' is not one of adamw, adam, sgd")
    if o.schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"optim.schedule: '{o.schedule}' is not one of constant, linear, cosine")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {o.lr}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype: '{cfg.model.dtype}' is not one of float32, bfloat16, float16")
    lg = cfg.logging
    if any(k < 1 or k > lg.val_samples for k in lg.pass_k):
        raise ConfigError(
            f"logging.pass_k={list(lg.pass_k)}: every k must be in [1, logging.val_samples="
            f"{lg.val_samples}] (the unbiased estimator needs n >= k)"
        )
    if lg.val_every < 1 or lg.ckpt_every < 1:
        raise ConfigError("logging.val_every and logging.ckpt_every must be >= 1")
    if (
        lg.tensorboard
        and importlib.util.find_spec("tensorboard") is None
        and importlib.util.find_spec("tensorboardX") is None
    ):
        raise ConfigError(
            "logging.tensorboard=true needs the tensorboard package: pip install "
            "'lightning_entropy[tensorboard]'"
        )
    _validate_data(cfg)
    _validate_model(cfg)
    from lightning_entropy.preflight import check_config

    check_config(cfg)  # trainer names, task, model path, run name: before any directory exists
    return comps


# estimators whose baseline compares responses to the same prompt (degenerate with one per group)
GROUP_BASELINES = {
    "grpo",
    "dr_grpo",
    "rloo",
    "qae",
    "canon",
    "mapo",
    "hapo_token",
    "passk",
    "opo",
    "gtpo",
    "grpo_s",
    "ucas",
    "riskpo",
    "aapo",
    "reinforce_pp_baseline",
}


def _world_size(t: Any) -> int:
    devices = t.devices
    n = (
        devices
        if isinstance(devices, int) and devices > 0
        else (len(devices) if isinstance(devices, (list, tuple)) else 1)
    )
    return max(1, n) * max(1, t.num_nodes)


def _validate_data(cfg: DictConfig) -> None:
    from lightning_entropy import data as data_mod

    d = cfg.data
    if d.path is None and d.task is None:
        raise ConfigError("data: set data.task (a built-in task) or data.path (a JSONL/Parquet file)")
    if d.path is not None:
        if not str(d.path).startswith("hf:") and not Path(d.path).is_file():
            raise ConfigError(f"data.path: file not found: {d.path}")
        if (
            d.val_path is not None
            and not str(d.val_path).startswith("hf:")
            and not Path(d.val_path).is_file()
        ):
            raise ConfigError(f"data.val_path: file not found: {d.val_path}")
    elif d.task not in data_mod.TASKS:
        raise ConfigError(f"data.task: unknown task '{d.task}'; built-in tasks: {', '.join(data_mod.TASKS)}")
    if d.train_size < 1 or d.val_size < 1:
        raise ConfigError("data.train_size and data.val_size must be >= 1")


def _validate_model(cfg: DictConfig) -> None:
    from lightning_entropy.models import BUILTIN_NAMES, BUILTIN_PREFIX

    name = cfg.model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        if name[len(BUILTIN_PREFIX) :] not in BUILTIN_NAMES:
            raise ConfigError(f"model.name_or_path: unknown built-in '{name}'")
        if cfg.data.task is None:
            raise ConfigError(
                "model.name_or_path=builtin:tiny is warm-started on a built-in task: set data.task"
            )
    elif Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {name} exists but has no config.json (not a HF checkpoint)")


def to_yaml(cfg: DictConfig) -> str:
    """The config as saved in a run directory (see :func:`saved_container`)."""
    return OmegaConf.to_yaml(cfg, resolve=not uses_env(cfg))


def saved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as stored in a checkpoint: resolved, except that a config reading environment
    variables (``${oc.env:VAR}``, often a secret) keeps every interpolation as written."""
    return OmegaConf.to_container(cfg, resolve=not uses_env(cfg))


def uses_env(cfg: DictConfig) -> bool:
    return "oc.env" in OmegaConf.to_yaml(cfg, resolve=False)

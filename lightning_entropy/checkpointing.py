"""Checkpoints on disk: atomic writes, and the checks a ``--resume`` runs before anything is built.

A checkpoint is written to a hidden temporary file in its own directory, flushed and fsynced, then
``os.replace``-d onto its name, so a reader sees the old file or the new one, never a partial one
(Lightning's default goes through ``$TMPDIR``; on another filesystem its move is a copy). A process
killed mid-write (SIGKILL, power loss) can leave only the temporary file, which the next run of that
directory removes (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_entropy.config import ConfigError

TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
# config keys that fix the policy's parameter shapes (the built-in tiny policy's are under model.tiny)
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions")


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save into a temporary file beside ``path``, fsync, then os.replace onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power loss


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint files left by a killed writer (one whose process is gone)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for f in directory.iterdir():
        m = TEMP_RE.match(f.name)
        if m and not _alive(int(m["pid"])):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing yet: anything with our pid is from a past life
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose saves are atomic on the checkpoint's own filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save(checkpoint, path)


# ---- resume ------------------------------------------------------------------------------------


@dataclass
class CheckpointMeta:
    path: Path
    global_step: int
    rl_step: int
    config: dict[str, Any] | None


def read_meta(path: str | Path, flag: str = "--resume") -> CheckpointMeta:
    """Open a checkpoint lazily (memory-mapped) and check it is one of ours; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag}: checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, a text file, a pickle of something else
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{flag}: {path} is not a readable checkpoint (truncated or not a torch file): {first}"
        ) from err
    state = ckpt.get("lightning_entropy") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "rl_step" not in state:
        raise ConfigError(
            f"{flag}: {path} is not a lightning_entropy checkpoint (no 'lightning_entropy' state)"
        )
    return CheckpointMeta(
        path=path,
        global_step=int(ckpt.get("global_step", 0)),
        rl_step=int(state["rl_step"]),
        config=state.get("config"),
    )


def model_differences(saved: dict[str, Any] | None, cfg: Any) -> list[str]:
    """What differs between the checkpoint's model and the one ``cfg`` would build, key by key."""
    if not saved or "model" not in saved:
        return []
    from lightning_entropy.models import BUILTIN_PREFIX

    old, new = _resolved_model(saved), cfg.model
    diffs = []
    old_name, new_name = str(old.get("name_or_path")), str(new.name_or_path)
    if old_name != new_name and not _same_dir(old_name, new_name):
        diffs.append(f"model.name_or_path: checkpoint {old_name!r}, now {new_name!r}")
    elif new_name.startswith(BUILTIN_PREFIX):
        for k in SHAPE_KEYS:
            a, b = (old.get("tiny") or {}).get(k), new.tiny.get(k)
            if a is not None and a != b:
                diffs.append(f"model.tiny.{k}: checkpoint {a}, now {b}")
    return diffs


def _resolved_model(saved: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's model section with interpolations (kept for ${oc.env:...}) resolved here."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(saved).model, resolve=True)
    except Exception:  # an interpolation that does not resolve here: compare as written
        return saved["model"]


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except OSError:
        return False


def _ckpt_step(p: Path) -> int:
    m = re.fullmatch(r"optstep(\d+)\.ckpt", p.name)
    return int(m.group(1)) if m else -1


def newer_checkpoint(meta: CheckpointMeta) -> str | None:
    """Why resuming ``meta`` in its own directory would start a second branch there, else None.

    The branch head is ``last.ckpt``; without one (a run killed before its first ``last.ckpt``),
    the newest ``optstep<N>.ckpt``."""
    ckpt_dir = meta.path.parent
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        if last.resolve() == meta.path.resolve():
            return None
        try:
            head = read_meta(last).rl_step
        except ConfigError:
            return f"{last} is unreadable"
        return f"the run continued to RL step {head} ({last})"
    newer = [p for p in ckpt_dir.glob("optstep*.ckpt") if _ckpt_step(p) > meta.global_step]
    if newer:
        return f"newer checkpoints exist ({max(newer, key=_ckpt_step)})"
    return None


def fork_dir(run_dir: Path, rl_step: int, name: str | None = None) -> Path:
    """A fresh sibling directory for a run continued from an older checkpoint."""
    if name:
        return run_dir.parent / name
    base = run_dir.parent / f"{run_dir.name}-fork{rl_step}"
    candidate, i = base, 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{i}")
        i += 1
    return candidate


__all__ = [
    "AtomicCheckpointIO",
    "CheckpointMeta",
    "atomic_save",
    "fork_dir",
    "model_differences",
    "newer_checkpoint",
    "read_meta",
    "remove_stale_temps",
]

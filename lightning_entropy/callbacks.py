"""Interrupts: SIGINT / SIGTERM (and Slurm's requeue signal) stop a run at the end of the current RL
step, with a checkpoint of that step, instead of losing up to ``ckpt_every - 1`` steps.

The signal handler only sets a flag. At the end of each RL step (``on_train_batch_end``) the ranks
agree on the flag, save ``checkpoints/last.ckpt`` and stop; ``fit`` then exits with 128 + the
signal number (130 for SIGINT, 143 for SIGTERM). A second SIGINT aborts at once, without saving.

Under Slurm (Lightning's ``SLURMEnvironment`` detects the job), the requeue signal (SIGUSR1 unless
the environment says otherwise; ask Slurm for it with ``#SBATCH --signal=USR1@120``) does the same
and then requeues the job with ``scontrol requeue``, as Lightning's own auto-requeue does. Lightning
saves in the signal handler, in the middle of a step, which cannot resume exactly when one step
holds several optimizer updates; here the save waits for the step's end. The requeued job reruns
the same command, which resumes the run from its ``last.ckpt`` (see ``__main__.resolve_run``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L

from lightning_entropy.checkpointing import remove_stale_temps


def slurm_requeue_signal() -> int | None:
    """The requeue signal when running inside a Slurm batch job, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    return int(getattr(SLURMEnvironment(), "requeue_signal", None) or signal.SIGUSR1)


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    job = slurm_job_id()
    if not job:
        return False
    try:
        rc = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        print("warning: scontrol not found; the job was not requeued", file=sys.stderr)
        return False
    if rc != 0:
        print(f"warning: scontrol requeue {job} failed with exit code {rc}", file=sys.stderr)
    return rc == 0


class GracefulStop(L.Callback):
    """Save ``last.ckpt`` and stop at the end of the RL step during which a stop signal arrived."""

    def __init__(self, ckpt_dir: str | Path, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.ckpt_dir = Path(ckpt_dir)
        self.signals = tuple(signals)
        self.requeue_signal = slurm_requeue_signal()
        self.received: int | None = None  # the first stop signal, set by the handler
        self.stopped: int | None = None  # the signal that stopped the run, once it stopped
        self.saved: Path | None = None
        self.requeued = False
        self._previous: dict[int, Any] = {}

    # ---- handlers -------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            # a second Ctrl-C: give up on the clean stop
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            print(
                f"\n{name} received: stopping after the current RL step with a checkpoint"
                + (" (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""),
                file=sys.stderr,
                flush=True,
            )

    def _install(self, signums: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in signums:
            self._previous.setdefault(s, signal.getsignal(s))
            signal.signal(s, self._handle)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.is_global_zero:
            remove_stale_temps(self.ckpt_dir)
        # Installed before Lightning registers its own handlers, so Lightning leaves the requeue
        # signal to us (it only takes a signal that has no handler yet)
        self._install(self.signals + ((self.requeue_signal,) if self.requeue_signal else ()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's SIGTERM handler (set after setup) would stop mid-way with no checkpoint
        self._install((signal.SIGTERM,) if signal.SIGTERM in self.signals else ())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, h in self._previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    # ---- the stop ------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # every rank must take the same decision: saving is collective
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        signum = self.received if self.received is not None else signal.SIGTERM
        path = self._save_last(trainer, pl_module, outputs, batch, batch_idx)
        self.saved, self.stopped = path, signum
        if self.requeue_signal is not None and signum == self.requeue_signal and trainer.is_global_zero:
            self.requeued = requeue_slurm_job()
        trainer.should_stop = True

    def _save_last(self, trainer: L.Trainer, *hook_args: Any) -> Path:
        """Through the run's ModelCheckpoint when there is one: its regular save first (the
        optstep<N>.ckpt due at this step, if any), else its last.ckpt alone; either way it records
        the save, so it neither writes last.ckpt again at train end nor names a later one last-v1."""
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) and Path(cb.dirpath) == self.ckpt_dir and cb.save_last:
                cb.on_train_batch_end(trainer, *hook_args)
                if cb._last_global_step_saved != trainer.global_step:
                    cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                return Path(cb.last_model_path)
        path = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(str(path), weights_only=False)
        return path

    def report(self, rl_step: int) -> str:
        name = signal.Signals(self.stopped).name if self.stopped else "?"
        msg = f"\nStopped by {name} after RL step {rl_step}; checkpoint: {self.saved}"
        if self.requeued:
            return msg + " (Slurm job requeued; it resumes from this checkpoint)"
        return msg + f"\nContinue with: python -m lightning_entropy fit --resume {self.saved}"


__all__ = ["GracefulStop", "requeue_slurm_job", "slurm_job_id", "slurm_requeue_signal"]

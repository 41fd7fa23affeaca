"""Health checks on each step's logged statistics: a warning, once per kind, with the value that
triggered it (entropy collapse or explosion, approx-KL spikes, no learning signal), and a clean stop
when update after update is non-finite."""

from __future__ import annotations

from collections.abc import Callable


class RunHealthError(RuntimeError):
    """The run cannot usefully continue; the message says why and what to change."""


class HealthMonitor:
    def __init__(
        self,
        *,
        entropy_min: float | None = 0.01,
        entropy_max: float | None = None,
        approx_kl_max: float | None = 0.5,
        zero_adv_steps: int = 10,
        max_skipped_steps: int = 3,
        warn: Callable[[str], None] = print,
    ) -> None:
        self.entropy_min, self.entropy_max, self.approx_kl_max = entropy_min, entropy_max, approx_kl_max
        self.zero_adv_steps, self.max_skipped_steps, self.warn = zero_adv_steps, max_skipped_steps, warn
        self.warned: set[str] = set()
        self.zero_adv_run = 0
        self.skipped_run = 0

    def _once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            self.warn(f"health: {message}")

    def check(self, step: int, stats: dict[str, float], updates: int) -> None:
        """``stats``: the step's logged means; ``updates``: optimizer steps the step attempted."""
        h = stats.get("train/entropy")
        if h is not None and self.entropy_min is not None and h < self.entropy_min:
            self._once("entropy_min", f"mean token entropy {h:.4g} nats at step {step} is below "
                       f"health.entropy_min={self.entropy_min}: the policy is collapsing")
        if h is not None and self.entropy_max is not None and h > self.entropy_max:
            self._once("entropy_max", f"mean token entropy {h:.4g} nats at step {step} is above "
                       f"health.entropy_max={self.entropy_max}: entropy is exploding")
        kl = stats.get("train/approx_kl")
        if kl is not None and self.approx_kl_max is not None and kl > self.approx_kl_max:
            self._once("approx_kl", f"approx-KL(pi_old || pi) {kl:.4g} at step {step} is above "
                       f"health.approx_kl_max={self.approx_kl_max}: updates move the policy too far "
                       "(lower optim.lr or use fewer mini-batches per rollout)")
        zero = stats.get("adv/zero_frac")
        self.zero_adv_run = self.zero_adv_run + 1 if zero is not None and zero >= 1.0 else 0
        if self.zero_adv_run >= self.zero_adv_steps:
            self._once("zero_adv", f"every advantage has been 0 for {self.zero_adv_run} steps (up to step "
                       f"{step}): no group has differing rewards, so there is no learning signal")
        skipped = stats.get("train/skipped_updates", 0.0)
        self.skipped_run = self.skipped_run + 1 if updates and skipped >= updates else 0
        if self.skipped_run >= self.max_skipped_steps:
            raise RunHealthError(
                f"every update of the last {self.skipped_run} steps (up to step {step}) had a non-finite "
                "loss or gradient and was skipped; the weights are unchanged since. Check the reward for "
                "NaN/inf, lower optim.lr, or raise health.max_skipped_steps"
            )

    def state_dict(self) -> dict[str, object]:
        return {"warned": sorted(self.warned), "zero_adv_run": self.zero_adv_run, "skipped_run": self.skipped_run}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.warned = set(state.get("warned", []))
        self.zero_adv_run = int(state.get("zero_adv_run", 0))
        self.skipped_run = int(state.get("skipped_run", 0))

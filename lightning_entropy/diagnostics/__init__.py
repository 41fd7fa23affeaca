"""Entropy-dynamics diagnostics: the maths (``maths``) and when it runs in an RL step (``runner``)."""

from lightning_entropy.diagnostics.maths import (
    RunningFit,
    answer_clusters,
    answer_entropy,
    discriminator_terms,
    effective_rank,
    entropy_law,
    fit_entropy_law,
    lens_entropy,
    predicted_change_discriminator,
    support,
)
from lightning_entropy.diagnostics.runner import Diagnostics

__all__ = [
    "Diagnostics",
    "RunningFit",
    "answer_clusters",
    "answer_entropy",
    "discriminator_terms",
    "effective_rank",
    "entropy_law",
    "fit_entropy_law",
    "lens_entropy",
    "predicted_change_discriminator",
    "support",
]

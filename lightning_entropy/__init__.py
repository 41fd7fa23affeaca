"""lightning_entropy: RLVR for language models, built for research on policy entropy."""

from lightning_entropy.registry import FAMILIES, register  # noqa: I001  (must come first)
from lightning_entropy.components import (  # noqa: F401  (registration happens on import)
    advantages,
    losses,
    regularizers,
    rewards,
    samplers,
    selectors,
)
from lightning_entropy.batch import RolloutBatch

__all__ = ["FAMILIES", "RolloutBatch", "register"]
__version__ = "0.1.0"

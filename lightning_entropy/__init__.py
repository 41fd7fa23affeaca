"""lightning_entropy: RLVR for language models, built for research on policy entropy."""

from lightning_entropy.registry import FAMILIES, register  # noqa: I001
import lightning_entropy.components  # noqa: F401,E402  (registers the built-in components)
from lightning_entropy.batch import RolloutBatch  # noqa: E402

__all__ = ["FAMILIES", "RolloutBatch", "register"]
__version__ = "0.1.0"

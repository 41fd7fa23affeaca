"""Component families; importing this package registers every built-in component."""

from lightning_entropy.components import (  # noqa: F401
    advantages,
    losses,
    regularizers,
    rewards,
    samplers,
    selectors,
)

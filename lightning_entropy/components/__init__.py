"""Component families, one module each. ``lightning_entropy/__init__`` imports them all so that every
built-in component is registered on import (here they would import the registry half-initialised)."""

"""jaxloc: digit classification + localisation on synthetic MNIST canvases, in JAX."""

from jaxloc import xla_flags

xla_flags.apply()

__version__ = "0.1.0"

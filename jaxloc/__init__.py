"""jaxloc: digit classification + localisation on synthetic MNIST canvases, in JAX."""

__version__ = "0.1.0"

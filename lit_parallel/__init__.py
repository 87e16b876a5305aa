"""lit_parallel: large-model training techniques as PyTorch Lightning plugins."""

from lit_parallel.errors import ConfigurationError, MissingDataError

__version__ = "0.1.0"
__all__ = ["ConfigurationError", "MissingDataError", "__version__"]

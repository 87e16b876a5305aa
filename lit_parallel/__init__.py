"""lit_parallel: large-model training techniques as PyTorch Lightning plugins.

Importing the package registers its strategy names with Lightning (``Trainer(strategy="hybrid_tp2")``).
"""

from lit_parallel.callbacks.preemption import PREEMPTION_EXIT_CODE, Preemption
from lit_parallel.errors import ConfigurationError, MissingDataError
from lit_parallel.parallel.families import ModelFamily, register_family
from lit_parallel.parallel.local_sgd import DiLoCo, LocalSGD
from lit_parallel.strategies import *  # noqa: F403  (registers the strategies)
from lit_parallel.strategies import __all__ as _strategies_all

__version__ = "0.1.0"
__all__ = ["PREEMPTION_EXIT_CODE", "ConfigurationError", "DiLoCo", "LocalSGD", "MissingDataError", "ModelFamily",
           "Preemption", "__version__", "register_family",
           *_strategies_all]

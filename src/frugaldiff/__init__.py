"""frugaldiff: diffusion training that works with small batches on one CPU or GPU."""

from .api import train
from .config import Config
from .errors import FrugalError
from .generate import sample
from .prediction import register_linear_prediction

__all__ = ["Config", "FrugalError", "register_linear_prediction", "sample", "train"]
__version__ = "0.1.0"

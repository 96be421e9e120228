"""lora-lego: merge many LoRA adapters into one, rank by rank (LoRA-LEGO) or with the usual baselines."""

__version__ = "0.1.0"

from .adapters import Adapter, load
from .errors import LoraLegoError
from .methods import METHODS
from .options import MergeOptions
from .pipeline import merge, merge_to_folder

__all__ = ["METHODS", "Adapter", "LoraLegoError", "MergeOptions", "__version__", "load", "merge", "merge_to_folder"]

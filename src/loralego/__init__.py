"""lora-lego: merge many LoRA adapters into one, rank by rank (LoRA-LEGO) or with the usual baselines."""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# The `loralego` command runs thousands of short torch ops between Python steps. With OpenMP's default active
# waiting, idle worker threads spin between them and, on a busy machine, take the core the working thread
# needs: a merge on 2 threads took 5-20x longer than on 1 under load (docs/performance.md). Passive waiting
# removes that. Set for the command only (a library user's process keeps its settings), only when unset, and
# before torch is imported (OpenMP reads it once, when torch loads).
if _sys.argv and _os.path.basename(_sys.argv[0]) == "loralego":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .adapters import Adapter, load
from .errors import LoraLegoError
from .methods import METHODS
from .options import MergeOptions
from .pipeline import merge, merge_to_folder

__all__ = ["METHODS", "Adapter", "LoraLegoError", "MergeOptions", "__version__", "load", "merge", "merge_to_folder"]

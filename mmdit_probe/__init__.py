"""mmdit_probe: mechanistic interpretability for MMDiT diffusion transformers (SD3 / SD3.5).

Record exact per-head joint attention (``AttentionRecorder``), split it into the four
query→key quadrants, and keep everything as a tidy, savable ``AttentionResult``.
"""

from .layout import KEY_GROUPS, QUERY_GROUPS, TEXT_GROUPS, TextToken, TokenLayout, joint_order
from .maps import QUADRANTS, MapBudgetError, MapSelection
from .named import Stat
from .processors import ProbeController, ProbeProcessor, Site
from .record import AttentionRecorder
from .result import AttentionResult
from .io import ResultsFileError

__version__ = "0.1.0"

def __getattr__(name):  # keep `import mmdit_probe` light: models pull in diffusers pipelines lazily
    if name in ("tiny_sd3_pipeline", "load_pipeline", "WeightsNotAvailableError"):
        from . import models

        return getattr(models, name)
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'mmdit_probe' has no attribute {name!r}")

__all__ = [
    "AttentionRecorder", "AttentionResult", "TokenLayout", "TextToken", "MapSelection", "MapBudgetError",
    "QUADRANTS", "KEY_GROUPS", "QUERY_GROUPS", "TEXT_GROUPS", "Stat", "ProbeController", "ProbeProcessor", "Site",
    "ResultsFileError", "joint_order", "tiny_sd3_pipeline", "load_pipeline", "WeightsNotAvailableError",
]

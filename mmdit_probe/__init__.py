"""mmdit_probe: mechanistic interpretability for MMDiT diffusion transformers (SD3 / SD3.5).

Record exact per-head joint attention (``AttentionRecorder``), split it into the four
query→key quadrants, and keep everything as a tidy, savable ``AttentionResult``.
"""

from .families import joint_order, prompt_layout
from .layout import KEY_GROUPS, QUERY_GROUPS, TEXT_GROUPS, TextToken, TokenLayout
from .maps import QUADRANTS, MapBudgetError, MapSelection
from .named import Stat
from .context import BRANCHES, CallContext, CallContextError
from .hooks import AttentionCall, Edit, ProbeController, ProbeProcessor, Site
from .selection import SelectionError
from .stats import Entropy, GroupMass, KeyMass, Mass, Statistic, WordMap
from .record import AttentionRecorder
from .result import AttentionResult
from .io import ResultsFileError
from .describe import Description, DescriptionRow, describe
from .compare import Comparison, LoraCounts, branch_view, compare, lora_parameter_counts, plot_difference
from .ablate import (AblateHeads, AblationError, ActivationCache, HeadMeans, Intervention, KnockOut, Patch, SkipLayers,
                     Spec, ZeroText, check_specs, intervene, record_activations, record_head_means)
from .effect import DEFAULT_METRICS, Metric, cosine, mse, psnr, run_pipeline, run_with_effects
from .sweep import ablate_each_head, knock_out_each_quadrant, skip_each_layer, sweep, zero_text_each_layer
from .sweep_settings import SweepFileError, SweepSettingsError
from .explorer import Explorer, ExploreBudgetError, explore
from .study import study
from .concepts import ConceptError, ConceptMaps, ConceptProbe, concept_maps
from .analyse import ImageAnalysis, analyse_image
from .steps import Schedule, StepStudy, image_convergence, interpolate_at_sigmas, layer_groups, plot_mass_vs_sigma, schedule, step_count_study

__version__ = "0.1.0"

def __getattr__(name):  # keep `import mmdit_probe` light: models pull in diffusers pipelines lazily
    if name in ("shapes_pipeline", "shapes_prompt_examples", "default_pipeline", "default_run_kwargs"):
        from . import shapes

        return getattr(shapes, name)
    if name in ("tiny_sd3_pipeline", "load_pipeline", "WeightsNotAvailableError"):
        from . import models

        return getattr(models, name)
    if name == "tiny_flux_pipeline":
        from .tiny_flux import tiny_flux_pipeline

        return tiny_flux_pipeline
    if name == "tiny_flux2_pipeline":
        from .tiny_flux2 import tiny_flux2_pipeline

        return tiny_flux2_pipeline
    if name == "tiny_qwen_image_pipeline":
        from .tiny_qwen import tiny_qwen_image_pipeline

        return tiny_qwen_image_pipeline
    if name == "tiny_chroma_pipeline":
        from .tiny_chroma import tiny_chroma_pipeline

        return tiny_chroma_pipeline
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'mmdit_probe' has no attribute {name!r}")

__all__ = [
    "concept_maps", "ConceptProbe", "ConceptMaps", "ConceptError", "analyse_image", "ImageAnalysis",
    "tiny_flux2_pipeline", "tiny_qwen_image_pipeline", "tiny_chroma_pipeline",
    "AttentionRecorder", "AttentionResult", "TokenLayout", "TextToken", "MapSelection", "MapBudgetError",
    "QUADRANTS", "KEY_GROUPS", "QUERY_GROUPS", "TEXT_GROUPS", "Stat", "ProbeController", "ProbeProcessor", "Site",
    "BRANCHES", "CallContext", "CallContextError", "AttentionCall", "Edit", "Statistic", "SelectionError", "Mass", "GroupMass", "Entropy", "KeyMass", "WordMap",
    "ResultsFileError", "joint_order", "prompt_layout",
    "describe", "Description", "DescriptionRow", "compare", "Comparison", "branch_view", "plot_difference",
    "lora_parameter_counts", "LoraCounts", "step_count_study", "StepStudy", "interpolate_at_sigmas",
    "plot_mass_vs_sigma", "image_convergence", "schedule", "Schedule", "layer_groups", "tiny_sd3_pipeline", "load_pipeline", "WeightsNotAvailableError",
    "default_pipeline", "default_run_kwargs", "shapes_pipeline", "shapes_prompt_examples",
    "intervene", "Intervention", "check_specs", "AblateHeads", "KnockOut", "Patch", "SkipLayers", "Spec", "ZeroText",
    "AblationError", "ActivationCache", "HeadMeans", "record_activations", "record_head_means", "DEFAULT_METRICS",
    "Metric", "cosine", "mse", "psnr", "run_pipeline", "run_with_effects", "sweep", "skip_each_layer",
    "zero_text_each_layer", "knock_out_each_quadrant", "ablate_each_head", "SweepSettingsError", "SweepFileError", "explore", "Explorer", "ExploreBudgetError", "study",
]

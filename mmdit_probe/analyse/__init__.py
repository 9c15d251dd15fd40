"""Real images: encode with the pipeline's VAE, noise to levels σ, record one transformer call per σ.

>>> res = analyse_image(pipe, image, "a red circle", sigmas=[0.3, 0.6], words=True, concepts=["square"])
>>> res.word_map("circle", step=0)          # step i = sigmas[i]; res.sigmas
>>> res.concepts.output_map("square", step=1)

:mod:`.grounding` scores maps against object masks (pointing, IoU); :mod:`.shapes_eval` runs the
shapes-world evaluation on generated and real scenes.
"""

from .families import AnalysisFamily, FluxAnalysis, SD3Analysis, analysis_family
from .grounding import iou_top_k, map_scores, pointing_hit, upsample_map
from .inputs import AnalysisInputs, AnalysisPlan, analysis_inputs, inputs_from_plan, plan_analysis, run_defaults
from .latents import check_sigmas
from .run import ImageAnalysis, analyse_image, run_analysis

__all__ = ["AnalysisFamily", "AnalysisInputs", "AnalysisPlan", "FluxAnalysis", "ImageAnalysis", "SD3Analysis",
           "analyse_image", "analysis_family", "analysis_inputs", "check_sigmas", "inputs_from_plan", "iou_top_k",
           "map_scores", "plan_analysis", "pointing_hit", "run_analysis", "run_defaults", "upsample_map"]

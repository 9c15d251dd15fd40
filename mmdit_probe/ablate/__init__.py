"""Ablations: frozen-dataclass specs, ``intervene`` (specs and user ``Edit`` s), reference-run caches."""

from .cache import PATCH_STREAMS, ActivationCache, HeadMeans, record_activations, record_head_means
from .conflicts import Touch, check_conflicts
from .intervene import Intervention, check_specs, intervene
from .rows import AblationError
from .specs import AblateHeads, KnockOut, Patch, SkipLayers, Spec, ZeroText

__all__ = ["PATCH_STREAMS", "AblateHeads", "AblationError", "ActivationCache", "HeadMeans", "Intervention", "KnockOut",
           "Patch", "SkipLayers", "Spec", "Touch", "ZeroText", "check_conflicts", "check_specs", "intervene",
           "record_activations", "record_head_means"]

"""The shapes world: a trained toy SD3 (MMDiT) with ground truth for interpretability checks."""

from .model import shapes_pipeline, shapes_prompt_examples

__all__ = ["shapes_pipeline", "shapes_prompt_examples"]

"""The shapes world: a trained toy SD3 (MMDiT) with ground truth for interpretability checks, and the
embedded default model. Training (:mod:`.train`) and evaluation are imported only on demand."""

from .model import default_pipeline, default_run_kwargs, shapes_pipeline, shapes_prompt_examples

__all__ = ["default_pipeline", "default_run_kwargs", "shapes_pipeline", "shapes_prompt_examples"]

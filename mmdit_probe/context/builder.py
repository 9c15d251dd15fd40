"""Build the :class:`CallContext` of each transformer call from the pipeline's own state.

- branches: CFG (``pipe.do_classifier_free_guidance``: ``[uncond ; cond]``), PAG
  (``pipe.do_perturbed_attention_guidance``: a ``perturbed`` group last), SLG (the pipeline passes
  ``skip_layers=`` only in its extra cond-only call: every row ``slg``) — never batch parity;
- step: the scheduler's ``step_index`` relative to its ``begin_index`` (img2img starts late), so
  SLG's extra call shares the step of its main call;
- prompts and layouts: matched by value against the encodings of this run (:mod:`.capture`).
"""

from __future__ import annotations

from typing import Any

import torch

from .call import CallContext, CallContextError
from .capture import PromptCapture

_TRANSFORMER_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                     "block_controlnet_hidden_states", "joint_attention_kwargs", "return_dict", "skip_layers")


def call_argument(args: tuple, kwargs: dict, name: str) -> Any:
    """Argument ``name`` of an ``SD3Transformer2DModel.forward`` call, positional or keyword."""
    if name in kwargs:
        return kwargs[name]
    i = _TRANSFORMER_ARGS.index(name)
    return args[i] if len(args) > i else None


class ContextBuilder:
    """Per-model state that turns each transformer call into a :class:`CallContext`."""

    def __init__(self, transformer: torch.nn.Module, pipe: Any | None):
        self.transformer = transformer
        self.pipe = pipe
        self.capture = PromptCapture(pipe) if pipe is not None else None
        self.index = -1
        self.run = -1
        self._last: tuple[int, int] | None = None  # (step, kind order) of the previous call
        self._bare_step = -1

    def start(self) -> None:
        if self.capture is not None:
            self.capture.start()

    def stop(self) -> None:
        if self.capture is not None:
            self.capture.stop()

    def build(self, args: tuple, kwargs: dict) -> CallContext:
        hs = call_argument(args, kwargs, "hidden_states")
        ehs = call_argument(args, kwargs, "encoder_hidden_states")
        t = call_argument(args, kwargs, "timestep")
        self.index += 1
        batch = hs.shape[0]
        p = self.transformer.config.patch_size
        grid = (hs.shape[-2] // p, hs.shape[-1] // p)
        timestep = t.reshape(-1)[0].detach() if torch.is_tensor(t) else torch.tensor(float("nan") if t is None else float(t))
        n_text = 0 if ehs is None else ehs.shape[1]
        if self.pipe is None:
            self.run, self._bare_step = 0, self._bare_step + 1
            return CallContext(self.index, 0, self._bare_step, "main", timestep, ("cond",) * batch, (None,) * batch,
                               (None,) * batch, None, grid, n_text, False)
        kind = "slg" if call_argument(args, kwargs, "skip_layers") is not None else "main"
        step = self._step()
        new_prompts = self.capture.new_since_last_match
        here = (step, 0 if kind == "main" else 1)
        if self._last is None or here <= self._last or (new_prompts and kind == "main"):
            self.run += 1
        self._last = here
        branches = self._branches(batch, kind)
        if ehs is not None:
            prompts, layouts = self.capture.match(ehs, grid)
        else:
            prompts, layouts = (None,) * batch, (None,) * batch
        n_steps = _pipeline_attr(self.pipe, "num_timesteps")
        return CallContext(self.index, self.run, step, kind, timestep, branches, prompts, layouts,
                           None if n_steps is None else int(n_steps), grid, n_text, True)

    def _step(self) -> int:
        sched = self.pipe.scheduler
        index = getattr(sched, "step_index", None)
        begin = getattr(sched, "begin_index", None) or 0
        return 0 if index is None else int(index) - int(begin)

    def _branches(self, batch: int, kind: str) -> tuple[str, ...]:
        if kind == "slg":
            return ("slg",) * batch
        groups = (["uncond"] if _pipeline_attr(self.pipe, "do_classifier_free_guidance") else []) + ["cond"]
        if _pipeline_attr(self.pipe, "do_perturbed_attention_guidance"):
            groups.append("perturbed")
        if batch % len(groups):
            raise CallContextError(
                f"the pipeline's state says each transformer call holds the groups {groups}, but this call has "
                f"{batch} rows (not a multiple of {len(groups)}). Was the transformer called outside the pipeline? "
                f"Record a bare transformer with AttentionRecorder(pipe.transformer, branches=...)"
            )
        per = batch // len(groups)
        return tuple(g for g in groups for _ in range(per))


def _pipeline_attr(pipe: Any, name: str) -> Any:
    """A pipeline property that exists only once ``__call__`` has set its state (None before)."""
    try:
        return getattr(pipe, name)
    except AttributeError:
        return None

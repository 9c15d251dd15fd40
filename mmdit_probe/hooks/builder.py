"""Build the :class:`CallContext` of each transformer call from the pipeline's own state.

- branches: CFG (``pipe.do_classifier_free_guidance``: ``[uncond ; cond]``), PAG
  (``pipe.do_perturbed_attention_guidance``: a ``perturbed`` group last), SLG (SD3 passes
  ``skip_layers=`` only in its extra cond-only call: every row ``slg``), Flux's true CFG (a separate
  call inside ``transformer.cache_context("uncond")``: every row ``uncond``) — never batch parity;
- step: the scheduler's ``step_index`` relative to its ``begin_index`` (img2img starts late), so
  extra calls share the step of their main call;
- prompts and layouts: matched by value against the encodings of this run (:mod:`.capture`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..context import CallContext, CallContextError
from ..families import Family
from .capture import PromptCapture

_KIND_ORDER = {"main": 0, "uncond": 1, "slg": 2}
_HOOK_NAME = "mmdit_probe.call_name"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CallNameHook(ModelHook):
    """A pass-through diffusers hook that receives the name a pipeline gives each call (``cache_context``)."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.state = StateManager(_NoState)

    def reset_state(self, module):
        """Pipelines reset stateful hooks after each call; this hook keeps no state of its own."""
        return module

    @property
    def call_name(self) -> str | None:
        try:
            return self.state.context.name
        except ValueError:  # no cache_context around this call
            return None


class ContextBuilder:
    """Per-model state that turns each transformer call into a :class:`CallContext`."""

    def __init__(self, transformer: torch.nn.Module, pipe: Any | None, family: Family):
        self.transformer, self.pipe, self.family = transformer, pipe, family
        self.capture = PromptCapture(pipe, family) if pipe is not None else None
        self.names = CallNameHook() if pipe is not None and family.uses_cache_context() else None
        self.index = -1
        self.run = -1
        self._last: tuple[int, int] | None = None  # (step, kind order) of the previous call
        self._bare_step = -1

    def start(self) -> None:
        if self.capture is not None:
            self.capture.start()
        if self.names is not None:
            HookRegistry.check_if_exists_or_initialize(self.transformer).register_hook(self.names, _HOOK_NAME)

    def stop(self) -> None:
        if self.capture is not None:
            self.capture.stop()
        if self.names is not None:
            HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(_HOOK_NAME, recurse=False)

    def build(self, args: tuple, kwargs: dict) -> CallContext:
        inp = self.family.call_inputs(self.transformer, args, kwargs)
        self.index += 1
        batch = inp.batch
        if self.pipe is None:
            self.run, self._bare_step = 0, self._bare_step + 1
            return CallContext(self.index, 0, self._bare_step, "main", inp.timestep, ("cond",) * batch, (None,) * batch,
                               (None,) * batch, None, inp.grid, inp.n_text, False)
        name = self.names.call_name if self.names is not None else None
        kind = "slg" if inp.slg else "uncond" if name == "uncond" else "main"
        step = self._step()
        if kind == "main" and self._follows_cond(step):
            kind = "uncond"
        new_prompts = self.capture.new_since_last_match
        here = (step, _KIND_ORDER[kind])
        if self._last is None or here <= self._last or (new_prompts and kind == "main"):
            self.run += 1
        self._last = here
        branches = self._branches(batch, kind)
        if inp.text is not None:
            prompts, layouts = self.capture.match(inp.text, inp.grid)
            if inp.context_grid is not None:  # Flux Kontext: the context image's tokens follow the generated ones
                layouts = tuple(None if lay is None else lay.with_context(inp.context_grid) for lay in layouts)
        else:
            prompts, layouts = (None,) * batch, (None,) * batch
        n_steps = _pipeline_attr(self.pipe, "num_timesteps")
        return CallContext(self.index, self.run, step, kind, inp.timestep, branches, prompts, layouts,
                           None if n_steps is None else int(n_steps), inp.grid, inp.n_text, True)

    def _follows_cond(self, step: int) -> bool:
        """A family whose pipeline predicts uncond in a second, unnamed call: this call is it when CFG is on, the
        previous call was this step's main call, and no prompt was encoded in between (a new run would have)."""
        return (self.family.separate_uncond_call and bool(_pipeline_attr(self.pipe, "do_classifier_free_guidance"))
                and self._last == (step, _KIND_ORDER["main"]) and not self.capture.new_since_last_match)

    def _step(self) -> int:
        sched = self.pipe.scheduler
        index = getattr(sched, "step_index", None)
        begin = getattr(sched, "begin_index", None) or 0
        return 0 if index is None else int(index) - int(begin)

    def _branches(self, batch: int, kind: str) -> tuple[str, ...]:
        if kind in ("slg", "uncond"):
            return (kind,) * batch
        batched_cfg = _pipeline_attr(self.pipe, "do_classifier_free_guidance") and not self.family.separate_uncond_call
        groups = (["uncond"] if batched_cfg else []) + ["cond"]
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

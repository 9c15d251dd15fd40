"""Per-call context shared by interventions and activation caches: step, CFG branch rows, token layouts.

A :class:`CallTracker` attaches to a model's :class:`~mmdit_probe.processors.ProbeController` and, on
every transformer call, publishes a :class:`CallState`: the step (transformer call index since the
tracker started, like ``AttentionRecorder``), the branch of every batch row (``[uncond ; cond]``
with CFG) and, for a pipeline, each row's :class:`~mmdit_probe.layout.TokenLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .capture import PromptCapture
from .layout import TokenLayout
from .processors import ProbeController, resolve_transformer

BRANCHES = ("uncond", "cond")


class AblationError(ValueError):
    """An ablation spec that does not fit the model, the run or the other specs (raised before compute)."""


@dataclass(frozen=True)
class CallState:
    """What one transformer call is: ``step``, ``branches`` (one name per batch row), ``layouts``."""

    step: int
    batch: int
    branches: tuple[str, ...]
    layouts: tuple[TokenLayout, ...] | None
    n_steps: int | None  # denoising steps of this pipeline run, None for a bare transformer
    pipeline: bool

    def rows(self, branch: str | None) -> tuple[int, ...]:
        """Batch rows of ``branch`` (all rows for ``None``)."""
        if branch is None:
            return tuple(range(self.batch))
        return tuple(i for i, b in enumerate(self.branches) if b == branch)


def block_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden_states, encoder_hidden_states)`` of a ``JointTransformerBlock`` call."""
    hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    ehs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[1] if len(args) > 1 else None)
    return hs, ehs


def replace_block_input(args: tuple, kwargs: dict, name: str, index: int, value: Any) -> tuple[tuple, dict]:
    """Copies of ``(args, kwargs)`` with input ``name`` (positional ``index``) set to ``value``."""
    kwargs = dict(kwargs)
    if name in kwargs or len(args) <= index:
        kwargs[name] = value
        return args, kwargs
    args = tuple(value if i == index else a for i, a in enumerate(args))
    return args, kwargs


def put_rows(t: torch.Tensor, rows: Sequence[int], value: torch.Tensor | float) -> torch.Tensor:
    """``t`` with ``t[rows]`` taken from ``value`` (a tensor shaped like ``t``, or a number).

    Returns a copy; when every row is replaced, ``value`` itself (or a filled tensor).
    """
    rows = list(rows)
    if rows == list(range(t.shape[0])):
        return value if isinstance(value, torch.Tensor) else torch.full_like(t, value)
    out = t.clone()
    idx = torch.as_tensor(rows, dtype=torch.long, device=t.device)
    out[idx] = value[idx].to(t.dtype) if isinstance(value, torch.Tensor) else value
    return out


class CallTracker:
    """Counts transformer calls since :meth:`start` and publishes the :class:`CallState` of each.

    Args:
        model: pipeline or bare ``SD3Transformer2DModel``.
        owner: the object that holds the controller (released in :meth:`stop`).
        layout: ``TokenLayout`` (or one per batch row) for a bare transformer; overrides capture.
        branches: branch name per batch row for a bare transformer (default: every row ``"cond"``).
        on_call: called with each new state before any block runs (may raise to stop the call).
    """

    def __init__(self, model: Any, owner: Any, *, layout: TokenLayout | Sequence[TokenLayout] | None = None,
                 branches: Sequence[str] | None = None, on_call: Callable[[CallState], None] | None = None):
        self.model = model
        self.transformer = resolve_transformer(model)
        self.pipe = model if hasattr(model, "transformer") else None
        self.owner = owner
        self.layout = layout
        self.branch_names = None if branches is None else tuple(branches)
        if self.branch_names is not None and any(b not in BRANCHES for b in self.branch_names):
            raise AblationError(f"branches must name each batch row 'uncond' or 'cond', got {self.branch_names}")
        self.on_call = on_call
        self.state: CallState | None = None
        self.controller: ProbeController | None = None
        self._capture: PromptCapture | None = None
        self._hook = None
        self._offset = 0
        self._last_full: tuple[int, tuple | None] | None = None

    def start(self) -> "CallTracker":
        ctl = ProbeController.of(self.model)
        ctl.acquire(self.owner)
        self.controller = ctl
        self._offset = ctl.call_index + 1
        try:
            if self.pipe is not None and self.layout is None:
                self._capture = PromptCapture(self.pipe).__enter__()
            # registered after the controller's own pre-hook: its call_index is already current here
            self._hook = self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self._hook is not None:
                self._hook.remove()
            if self._capture is not None:
                self._capture.__exit__(None, None, None)
        finally:
            self._hook, self._capture = None, None
            if self.controller is not None:
                self.controller.release(self.owner)
            self.state = None

    # ---- per call -----------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        info = self.controller.last_call
        slg = self._is_slg_call(kwargs)
        state = CallState(
            step=info.call - self._offset, batch=info.batch, branches=self._branches(info.batch, slg),
            layouts=self._layouts(info, slg), n_steps=self._n_steps(), pipeline=self.pipe is not None,
        )
        self.state = state
        if self.on_call is not None:
            self.on_call(state)
        return None

    def _cfg(self) -> bool:
        try:
            return bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:  # the pipeline has not been called yet
            return False

    def _is_slg_call(self, kwargs: dict) -> bool:
        """The extra cond-only call of skip-layer guidance: the pipeline passes ``skip_layers`` only there."""
        return self.pipe is not None and self._cfg() and kwargs.get("skip_layers") is not None

    def _branches(self, batch: int, slg: bool) -> tuple[str, ...]:
        if self.branch_names is not None:
            if len(self.branch_names) != batch:
                raise AblationError(f"branches names {len(self.branch_names)} rows but the transformer batch is {batch}")
            return self.branch_names
        if self.pipe is not None and self._cfg() and not slg and batch % 2 == 0:
            return ("uncond",) * (batch // 2) + ("cond",) * (batch // 2)
        return ("cond",) * batch

    def _layouts(self, info, slg: bool) -> tuple[TokenLayout, ...] | None:
        if self.layout is not None:
            rows = [self.layout] * info.batch if isinstance(self.layout, TokenLayout) else list(self.layout)
            if len(rows) != info.batch:
                raise AblationError(f"layout has {len(rows)} rows but the transformer batch is {info.batch}")
            return tuple(rows)
        if self._capture is None:
            return None
        if slg and self._last_full is not None and self._last_full[0] == 2 * info.batch and self._last_full[1]:
            return self._last_full[1][info.batch:]  # cond half of the main call
        rows = self._capture.row_layouts(info.batch, info.latent_hw, info.n_text)
        out = tuple(rows) if rows is not None else None
        self._last_full = (info.batch, out)
        return out

    def _n_steps(self) -> int | None:
        if self.pipe is None:
            return None
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if timesteps is None:
            return None
        return len(timesteps)  # skip-layer guidance adds calls, but they cannot be foreseen: not selectable

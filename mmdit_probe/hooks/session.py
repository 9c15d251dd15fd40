"""``ProbeSession``: one user's attachment to a model's :class:`ProbeController` (baukit-style:
attach in :meth:`start`, detach everything in :meth:`stop`, also after an exception)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from ..context import CallContext
from .controller import Handle, ProbeController
from .sites import Site, resolve_transformer


class ProbeSession:
    """Acquire the controller for ``owner``, attach edits and a call listener by handle, release on stop."""

    def __init__(self, model: Any, owner: Any, *, layout: Any = None, branches: Sequence[str] | None = None,
                 on_call: Callable[[CallContext], None] | None = None):
        self.model, self.owner = model, owner
        self.transformer: torch.nn.Module = resolve_transformer(model)
        self.pipe = model if model is not self.transformer else None
        self.layout, self.branches, self.on_call = layout, branches, on_call
        self.controller: ProbeController | None = None
        self._handles: list[Handle] = []

    @property
    def context(self) -> CallContext | None:
        """The current transformer call's context (None between calls)."""
        return None if self.controller is None else self.controller.context

    def start(self) -> "ProbeSession":
        ctl = ProbeController.of(self.model)
        ctl.acquire(self.owner, layout=self.layout, branches=self.branches)
        self.controller = ctl
        try:
            if self.on_call is not None:
                self._handles.append(ctl.add_call_listener(self.on_call))
        except BaseException:
            self.stop()
            raise
        return self

    def add_edit(self, edit: Any, sites: Iterable[Site] | None = None) -> Handle:
        h = self.controller.add_edit(edit, sites)
        self._handles.append(h)
        return h

    def stop(self) -> None:
        try:
            for h in reversed(self._handles):
                h.remove()
        finally:
            self._handles = []
            if self.controller is not None:
                self.controller.release(self.owner)
            self.controller = None

"""``ProbeController``: owns the probe processors of one transformer while anyone uses them.

The first user's :meth:`~ProbeController.acquire` installs a :class:`ProbeProcessor` per attention
module and one forward pre-hook that builds the call's :class:`~mmdit_probe.context.CallContext`
(once, for every user); the last :meth:`~ProbeController.release` puts the original processors
back — also after an exception. Edits, observers and call listeners are attached by
:class:`Handle` and detached with ``handle.remove()``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from ..context import CallContext
from ..families import Site, family_of, resolve_transformer
from ..families.hooked import HookedProcessor
from ..layout import TokenLayout
from .builder import ContextBuilder
from .pag import PAG_PROCESSORS, PagObserver


def in_backward() -> bool:
    """True while autograd runs a backward pass (where gradient checkpointing recomputes blocks)."""
    return torch._C._current_graph_task_id() != -1


class Handle:
    """Detaches what it was returned for; ``remove()`` is idempotent."""

    def __init__(self, remove: Callable[[], None]):
        self._remove: Callable[[], None] | None = remove

    def remove(self) -> None:
        if self._remove is not None:
            fn, self._remove = self._remove, None
            fn()


class ProbeController:
    """Probe processors, call context and attachments of one transformer."""

    _ATTR = "_mmdit_probe_controller"

    def __init__(self, transformer: torch.nn.Module, pipe: Any | None):
        self.transformer = transformer
        self.pipe = pipe
        self.family = family_of(transformer)
        self.order = self.family.order
        self.sites = self.family.sites(transformer)
        self.processors: dict[str, HookedProcessor] = {}
        self.context: CallContext | None = None
        self.last_context: CallContext | None = None
        self._builder: ContextBuilder | None = None
        self._users: list[Any] = []
        self._originals: dict[str, Any] = {}
        self._hooks: list[Any] = []
        self._listeners: list[Callable[[CallContext], None]] = []
        self._observers: dict[Site, list[Any]] = {}
        self._edits: dict[Site, list[Any]] = {}
        self._overrides: dict[int, tuple[Any, tuple[str, ...] | None]] = {}

    @classmethod
    def of(cls, model: Any) -> "ProbeController":
        """The controller of ``model``'s transformer (created on first use, removed when its last user leaves)."""
        tr = resolve_transformer(model)
        pipe = model if model is not tr else None
        ctl = tr.__dict__.get(cls._ATTR)
        if ctl is None:
            return cls(tr, pipe)
        if pipe is not None and ctl.pipe is not pipe:
            raise RuntimeError(
                "this transformer is already probed through another pipeline (or as a bare transformer); exit that "
                "recorder / intervention first"
            )
        return ctl

    @property
    def num_layers(self) -> int:
        return len(self.family.blocks(self.transformer))

    # ---- users --------------------------------------------------------------------------
    def acquire(self, user: Any, *, layout: Any = None, branches: Sequence[str] | None = None) -> None:
        """Attach ``user``; ``layout`` (one ``TokenLayout`` or one per row) and ``branches`` describe a bare
        transformer's rows (they override what the call context would say; every user sees them)."""
        if any(u is user for u in self._users):
            raise RuntimeError(f"{type(user).__name__} is already active on this model; exit it before entering again")
        rows = (layout, None if branches is None else tuple(branches))
        for other in self._overrides.values():
            if any(a is not None and b is not None and a != b for a, b in zip(rows, other)):
                raise RuntimeError("two users of this model describe its batch rows differently (layout= / branches=); "
                                   "pass the same description to both, or to one of them only")
        if not self._users:
            self._install()
        self._users.append(user)
        if rows != (None, None):
            self._overrides[id(user)] = rows

    def release(self, user: Any) -> None:
        self._users = [u for u in self._users if u is not user]
        self._overrides.pop(id(user), None)
        if not self._users:
            self._uninstall()

    def users(self, kind: type | None = None) -> list[Any]:
        return [u for u in self._users if kind is None or isinstance(u, kind)]

    # ---- attachments --------------------------------------------------------------------
    def add_observer(self, observer: Any, sites: Iterable[Site]) -> Handle:
        return self._attach(self._observers, observer, sites)

    def add_edit(self, edit: Any, sites: Iterable[Site] | None = None) -> Handle:
        """Attach an :class:`~mmdit_probe.hooks.Edit` at ``sites`` (default: where ``edit.applies_to``)."""
        chosen = [s for s in self.sites if edit.applies_to(s)] if sites is None else list(sites)
        return self._attach(self._edits, edit, chosen)

    def add_call_listener(self, fn: Callable[[CallContext], None]) -> Handle:
        """``fn(context)`` runs at the start of every transformer call, before any block (it may raise)."""
        self._listeners.append(fn)
        return Handle(lambda: self._listeners.remove(fn) if fn in self._listeners else None)

    def _attach(self, table: dict, obj: Any, sites: Iterable[Site]) -> Handle:
        sites = list(sites)
        for s in sites:
            table.setdefault(s, []).append(obj)
        self._sync()

        def remove() -> None:
            for s in sites:
                lst = table.get(s, [])
                table[s] = [o for o in lst if o is not obj]
            self._sync()
        return Handle(remove)

    def _sync(self) -> None:
        """Push attachments into the processors (plain tuples, so compiled code guards on stable objects)."""
        for p in self.processors.values():
            p.observers = tuple(self._observers.get(p.site, ()))
            p.edits = tuple(self._edits.get(p.site, ()))
            p.needs_lse = bool(p.observers) or any(e.needs_lse for e in p.edits)

    def current_context(self) -> CallContext:
        if self.context is None and self.last_context is not None and in_backward():
            return self.last_context  # gradient checkpointing recomputes the last call's blocks inside backward()
        if self.context is None:
            raise RuntimeError(
                "an attention call ran without a call context: the recorder / intervention was entered inside a "
                "transformer forward. Enter it before calling the pipeline or transformer"
            )
        return self.context

    # ---- installation -------------------------------------------------------------------
    def _install(self) -> None:
        originals = dict(self.transformer.attn_processors)
        by_site = {f"{s.name}.processor": s for s in self.sites}
        missing = set(originals) - set(by_site)
        if missing:
            raise TypeError(f"unexpected attention processors {sorted(missing)[:3]}; is this a {self.family.name} model?")
        processors = {key: self.family.processor(site, self, originals[key]) for key, site in by_site.items()}
        self._builder = ContextBuilder(self.transformer, self.pipe, self.family)
        self._originals, self.processors = originals, processors
        self.transformer.__dict__[self._ATTR] = self
        try:
            self.transformer.set_attn_processor(dict(processors))
            self._builder.start()
            self._hooks = [
                self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                self.transformer.register_forward_hook(self._post_hook),
            ]
        except BaseException:
            self._uninstall()
            raise
        self._sync()

    def _uninstall(self) -> None:
        try:
            if self._originals:
                self.transformer.set_attn_processor(dict(self._originals))
        finally:
            for h in self._hooks:
                h.remove()
            if self._builder is not None:
                self._builder.stop()
            self._hooks, self._originals, self.processors, self._builder = [], {}, {}, None
            self._listeners, self._observers, self._edits = [], {}, {}
            self.context = self.last_context = None
            self.transformer.__dict__.pop(self._ATTR, None)

    @torch.compiler.disable
    def _pre_hook(self, module, args, kwargs):
        ctx = self._builder.build(args, kwargs)
        for layout, branches in self._overrides.values():
            rows = None if layout is None else [layout] * ctx.batch if isinstance(layout, TokenLayout) else list(layout)
            ctx = ctx.with_rows(branches=branches, layouts=rows)
        self.context = ctx
        self._observe_swapped_processors()
        for fn in list(self._listeners):
            fn(self.context)
        return None

    @torch.compiler.disable
    def _post_hook(self, module, args, output):
        self.last_context, self.context = self.context, None
        return None

    def _observe_swapped_processors(self) -> None:
        """Wrap processors a pipeline swapped in during its call (PAG) so their layers are observed too."""
        for s in self.sites:
            module = self.transformer.get_submodule(s.name)
            proc = module.processor
            if isinstance(proc, (HookedProcessor, PagObserver)):
                continue
            if isinstance(proc, PAG_PROCESSORS):
                if self._edits.get(s):
                    raise RuntimeError(
                        f"layer {s.layer} is a PAG layer: PAG replaces its attention during the call, so attention "
                        f"edits (KnockOut, AblateHeads, SkipLayers(mode='attention'), user Edits) cannot apply there. "
                        f"Leave layer {s.layer} out of the edit, or out of pag_applied_layers"
                    )
                module.processor = PagObserver(s, self, proc, tuple(self._observers.get(s, ())))
                continue
            raise RuntimeError(
                f"{s.name} now uses {type(proc).__name__}, set after the probe was installed; mmdit_probe observes "
                f"its own processors and PAG's only"
            )

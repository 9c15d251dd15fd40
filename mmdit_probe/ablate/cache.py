"""Reference runs for interventions: block activations for :class:`Patch`, per-head means for
:class:`AblateHeads` (``mode="mean"``).

>>> with mp.record_activations(pipe, layers=[3]) as clean:
...     pipe(clean_prompt, generator=torch.manual_seed(0))
>>> with mp.intervene(pipe, mp.Patch(clean, layers=[3], stream="image")):
...     pipe(corrupt_prompt, generator=torch.manual_seed(0))

Memory: every kept ``(step, layer, stream)`` holds ``batch × tokens × width`` values (SD3-medium at
1024², CFG: ~50 MB per image-stream entry), so select ``layers`` / ``steps`` / ``streams`` on real
models, and ``to="cpu"`` to keep them off the GPU.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..context import CallContext
from ..families import family_of
from ..families.base import BlockIO, call_argument
from ..hooks import Edit, ProbeSession, model_blocks, resolve_transformer
from ..selection import SelectionError, as_indices, fmt_ints
from .rows import AblationError

#: What :func:`record_activations` can keep and :class:`~mmdit_probe.Patch` can patch.
PATCH_STREAMS = ("image", "text", "attention", "pooled")

Key = tuple[int, "int | None", str]


class ActivationCache:
    """Activations of one recorded run: ``(step, layer, stream) → tensor``; a context manager that records.

    Streams: ``"image"`` / ``"text"`` — a block's output hidden states ``[B, N, C]``;
    ``"attention"`` — its ``attn`` output ``(image [B, N_img, C], text [B, N_txt, C])`` (a single-stream block's
    joined output split at the call's text length; on Flux.2 it holds the parallel MLP too);
    ``"pooled"`` — the transformer's ``pooled_projections [B, P]`` (layer ``None``; not kept for families
    without pooled conditioning). Streams are read through the family's ``BlockIO``.
    """

    def __init__(self, model: Any, layers: Iterable[int] | None = None, *,
                 streams: Sequence[str] = PATCH_STREAMS, steps: Iterable[int] | None = None,
                 to: str | torch.device | None = None, name: str | None = None):
        self.model = model
        tr = resolve_transformer(model)
        n = len(model_blocks(tr))
        self.layers = _layers(layers, n, "record_activations")
        unknown = [s for s in streams if s not in PATCH_STREAMS]
        if unknown or not streams:
            raise AblationError(f"record_activations: unknown streams {unknown or '(empty)'}; use {PATCH_STREAMS}")
        self.streams = tuple(streams)
        self.step_filter = _checked(lambda: as_indices(steps, "steps", owner="record_activations"))
        self.to = to
        self.name = name
        self.data: dict[Key, Any] = {}
        self._tracker: ProbeSession | None = None
        self._hooks: list[Any] = []

    # ---- access -----------------------------------------------------------------------
    def get(self, step: int, layer: int | None, stream: str):
        key = (int(step), None if stream == "pooled" else int(layer), stream)
        if key not in self.data:
            raise AblationError(
                f"the source run has no {stream} activation at step {step}"
                + ("" if stream == "pooled" else f", layer {layer}")
                + f"; it recorded steps {fmt_ints(self.steps) or '(none)'}, layers {fmt_ints(self.recorded_layers(stream)) or '(none)'}"
            )
        return self.data[key]

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({k[0] for k in self.data}))

    def recorded_layers(self, stream: str) -> tuple[int, ...]:
        return tuple(sorted({k[1] for k in self.data if k[2] == stream and k[1] is not None}))

    def check(self, stream: str, layers: Sequence[int], steps: Sequence[int] | None, what: str) -> None:
        """Raise unless this cache holds ``stream`` at ``layers`` and ``steps`` (all recorded steps for None)."""
        if self._tracker is not None:
            raise AblationError(f"{what}: the source cache is still recording; patch from it after its `with` block")
        if not self.data:
            raise AblationError(f"{what}: the source cache is empty; run the clean prompt inside `with record_activations(...)` first")
        if stream not in {k[2] for k in self.data}:
            raise AblationError(f"{what}: the source run did not record the {stream!r} stream (record_activations(streams=...))")
        missing = [l for l in layers if l not in self.recorded_layers(stream)]
        if missing:
            raise AblationError(f"{what}: the source run did not record layers {missing}; it has {fmt_ints(self.recorded_layers(stream))}")
        gone = [s for s in steps or () if s not in self.steps]
        if gone:
            raise AblationError(f"{what}: the source run has no steps {gone}; it recorded steps {fmt_ints(self.steps)}")

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"ActivationCache(name={self.name!r}, entries={len(self.data)}, steps={fmt_ints(self.steps)!r})"

    # ---- recording ----------------------------------------------------------------------
    def __enter__(self) -> "ActivationCache":
        if self.data or self._tracker is not None:
            raise RuntimeError("this ActivationCache already holds a run; call record_activations(...) again for a new one")
        self._tracker = ProbeSession(self.model, self, on_call=self._on_call).start()
        try:
            tr = self._tracker.transformer
            family = family_of(tr)
            if "pooled" in self.streams:
                self._hooks.append(tr.register_forward_pre_hook(self._pooled_hook, with_kwargs=True))
            for l in self.layers:
                block, io = model_blocks(tr)[l], family.block_io(tr, l)
                if {"image", "text"} & set(self.streams):
                    self._hooks.append(block.register_forward_hook(self._block_hook(l, io)))
                if "attention" in self.streams:
                    self._hooks.append(block.attn.register_forward_hook(self._attn_hook(l, io)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._tracker is not None:
            self._tracker.stop()
        self._tracker = None

    def _on_call(self, ctx: CallContext) -> None:
        if self.name is None and ctx.layouts and ctx.layouts[-1] is not None:
            prompt = ctx.layouts[-1].prompt
            self.name = repr(prompt) if prompt is not None else None

    def _keep(self) -> CallContext | None:
        """The current call's context when this call is stored (its step), else None (not selected; SLG's extra
        call is never stored)."""
        ctx = self._tracker.context if self._tracker is not None else None
        if ctx is None or ctx.kind != "main" or (self.step_filter is not None and ctx.step not in self.step_filter):
            return None
        return ctx

    def _store(self, key: Key, value: Any) -> None:
        def prep(t):
            t = t.detach()
            return t.to(self.to) if self.to is not None else t
        self.data[key] = tuple(prep(v) for v in value) if isinstance(value, tuple) else prep(value)

    def _pooled_hook(self, module, args, kwargs):
        ctx = self._keep()
        pooled = call_argument(args, kwargs, "pooled_projections", 2)
        if ctx is not None and pooled is not None:
            self._store((ctx.step, None, "pooled"), pooled)

    def _block_hook(self, layer: int, io: BlockIO):
        def hook(module, args, output):
            ctx = self._keep()
            if ctx is None:
                return None
            image, text = io.outputs(output, ctx.n_text)
            if "image" in self.streams:
                self._store((ctx.step, layer, "image"), image)
            if "text" in self.streams and text is not None:
                self._store((ctx.step, layer, "text"), text)
            return None
        return hook

    def _attn_hook(self, layer: int, io: BlockIO):
        def hook(module, args, output):
            ctx = self._keep()
            if ctx is not None:
                self._store((ctx.step, layer, "attention"), io.attention(output, ctx.n_text))
            return None
        return hook


def record_activations(model: Any, layers: Iterable[int] | None = None, *, streams: Sequence[str] = PATCH_STREAMS,
                       steps: Iterable[int] | None = None, to: str | torch.device | None = None,
                       name: str | None = None) -> ActivationCache:
    """Context manager recording block activations of the runs inside it, for :class:`Patch`.

    ``layers`` / ``steps`` (default all) and ``streams`` (``"image"``, ``"text"``, ``"attention"``,
    ``"pooled"``) limit what is kept; ``to="cpu"`` moves each tensor off the accelerator; ``name``
    labels the source in ``Patch.describe()`` (default: the prompt). One run per cache.
    """
    return ActivationCache(model, layers, streams=streams, steps=steps, to=to, name=name)


class HeadMeans:
    """Per-head mean attention outputs of reference runs; a context manager that records them.

    Keeps ``sum`` and ``count`` per ``(step, layer, attention, branch)`` of the head outputs
    ``[H, N, D]`` (before the output projection), summed over batch rows of every run inside the
    ``with`` block; :meth:`mean_for` divides. Memory: ``steps × layers × H × N × D`` floats.
    """

    def __init__(self, model: Any, layers: Iterable[int] | None = None, branches: Sequence[str] | None = None):
        self.model = model
        self.branches = branches
        tr = resolve_transformer(model)
        n = len(model_blocks(tr))
        self.layers = _layers(layers, n, "record_head_means")
        self.sums: dict[tuple[int, int, str, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, int, str, str], int] = {}
        self._tracker: ProbeSession | None = None

    def __enter__(self) -> "HeadMeans":
        if self._tracker is not None:
            raise RuntimeError("this HeadMeans is already recording")
        self._tracker = ProbeSession(self.model, self, branches=self.branches).start()
        try:
            self._tracker.add_edit(_HeadMeanEdit(self, self.layers))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._tracker is not None:
            self._tracker.stop()  # removes the edit by its handle and releases the controller
        self._tracker = None

    def add(self, call, out: torch.Tensor) -> None:
        ctx, site = call.context, call.site
        for branch in dict.fromkeys(ctx.branches):
            rows = list(ctx.rows(branch))
            key = (ctx.step, site.layer, site.attention, branch)
            total = out[rows].detach().float().sum(0)
            self.sums[key] = self.sums[key] + total if key in self.sums else total
            self.counts[key] = self.counts.get(key, 0) + len(rows)

    def mean_for(self, step: int, layer: int, attention: str, branch: str) -> torch.Tensor:
        """Mean head outputs ``[H, N, D]`` (fp32) at one step, layer and branch."""
        key = (step, layer, attention, branch)
        if key not in self.sums:
            have = sorted({k[0] for k in self.sums if k[1:] == key[1:]})
            raise AblationError(
                f"the head-mean reference has no {attention} outputs for step {step}, layer {layer}, branch {branch!r}; "
                f"it has steps {fmt_ints(have) or '(none)'} there (record the reference with the same steps and CFG setting)"
            )
        return self.sums[key] / self.counts[key]

    def check(self, layers: Sequence[int], attention: str, what: str) -> None:
        if self._tracker is not None:
            raise AblationError(f"{what}: the head-mean reference is still recording; use it after its `with` block")
        have = {(k[1], k[2]) for k in self.sums}
        missing = [l for l in layers if (l, attention) not in have]
        if missing:
            raise AblationError(
                f"{what}: the head-mean reference has no {attention} outputs for layers {missing} "
                f"(record_head_means(pipe, layers=...) and run a reference prompt inside it)"
            )


class _HeadMeanEdit(Edit):
    """A no-op head edit that accumulates the head outputs into ``means``."""

    def __init__(self, means: HeadMeans, layers: tuple[int, ...]):
        super().__init__(layers, attentions=("attn", "attn2"))
        self.means = means

    def edit_heads(self, call, out: torch.Tensor) -> torch.Tensor:
        self.means.add(call, out)
        return out


def _checked(fn):
    try:
        return fn()
    except SelectionError as err:
        raise AblationError(str(err)) from None


def _layers(layers: Any, n: int, owner: str) -> tuple[int, ...]:
    return tuple(range(n)) if layers is None else _checked(lambda: as_indices(layers, "layers", owner=owner, n=n))


def record_head_means(model: Any, layers: Iterable[int] | None = None,
                      branches: Sequence[str] | None = None) -> HeadMeans:
    """Context manager recording per-head mean outputs of the runs inside it, for ``AblateHeads(mode="mean")``.

    Means are kept per CFG branch; ``branches`` names the rows of a bare transformer's batch (default all ``"cond"``).
    """
    return HeadMeans(model, layers, branches)

"""``AttentionRecorder``: record exact per-head attention statistics of every MMDiT block.

>>> with AttentionRecorder(pipe) as rec:
...     pipe(prompt, num_inference_steps=4)
>>> rec.result.to_dataframe()   # step, timestep, layer, attention, batch, branch, prompt, head, query, key, mass

Every transformer call's :class:`~mmdit_probe.context.CallContext` says which denoising step it
is and which branch (``uncond`` / ``cond`` / ``slg`` / ``perturbed``) and prompt each row carries;
the result's ``batch`` dim holds one entry per distinct ``(branch, index)`` row, so SLG's extra
call lands in ``slg`` rows of the same step. Default cost: one extra fused-kernel pass over the
text keys per attention call; memory ``O(steps × layers × rows × heads)``. Everything else is opt-in.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from .concepts import ConceptMaps, ConceptProbe
from .context import CallContext
from .hooks import AttentionCall, Handle, ProbeController, model_blocks, resolve_transformer
from .kernels import probabilities
from .layout import TokenLayout
from .maps import MapBudgetError, MapSelection, format_bytes
from .recording import Recording, assemble
from .result import AttentionResult
from .selection import as_indices
from .stats import Entropy, GroupMass, KeyMass, Mass, Statistic, WordMap


class AttentionRecorder:
    """Context manager that records attention statistics for every transformer call.

    Args:
        model: a ``StableDiffusion3Pipeline`` (also img2img, inpaint, ControlNet, PAG) or an ``SD3Transformer2DModel``.
        layers: block indices to record (default all).
        groups: also record masses over the fine key groups (CLIP/T5 × real/special/padding).
        words: per-word image→text maps: ``True`` for every prompt word, or a list of words.
        word_heads: ``"mean"`` (default) keeps the head mean of the word maps, ``"all"`` every head.
        entropy: attention entropy per query group (one extra fused pass).
        key_mass: attention received by each key token, summed over image / text queries.
        statistics: extra :class:`~mmdit_probe.stats.Statistic` s (your own), recorded like the built-ins.
        maps: ``MapSelection``\\ (s) of exact full softmax maps to keep (``batch`` = result rows).
        map_budget_bytes: refuse full maps and word maps needing more than this (checked before allocating).
        layout: ``TokenLayout`` (or one per batch row) when recording a bare transformer.
        branches: branch name per batch row for a bare transformer (default all ``"cond"``).
        concepts: words to carry as read-only concept tokens (:class:`~mmdit_probe.ConceptProbe`, the pipeline's
            own encoders); their maps are ``rec.concepts`` (a ``ConceptMaps``). ``concept_options``: keyword
            arguments for the probe (``max_sequence_length``, ``heads``, ``layers``, ``steps``, ``budget_bytes``).
    """

    def __init__(
        self,
        model: Any,
        *,
        layers: int | Iterable[int] | None = None,
        groups: bool = False,
        words: bool | Sequence[str] = False,
        word_heads: str = "mean",
        entropy: bool = False,
        key_mass: bool = False,
        statistics: Sequence[Statistic] = (),
        maps: MapSelection | Sequence[MapSelection] | None = None,
        map_budget_bytes: int = 1 << 30,
        layout: TokenLayout | Sequence[TokenLayout] | None = None,
        branches: Sequence[str] | None = None,
        concepts: Sequence[str] | None = None,
        concept_options: Mapping[str, Any] | None = None,
    ):
        self.model = model
        tr = resolve_transformer(model)  # validates the model class now
        n_layers = len(model_blocks(tr))
        self.heads = tr.config.num_attention_heads
        self.layers = tuple(range(n_layers)) if layers is None else as_indices(
            layers, "layers", owner="AttentionRecorder", n=n_layers)
        self.statistics: tuple[Statistic, ...] = tuple(
            [Mass()] + ([GroupMass()] if groups else []) + ([Entropy()] if entropy else [])
            + ([KeyMass()] if key_mass else []) + ([WordMap(words, word_heads)] if words else []) + list(statistics))
        names = [s.name for s in self.statistics]
        bad = [s for s in self.statistics if not isinstance(s, Statistic) or not s.name]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"statistics must be Statistic instances with distinct, non-empty names; got {names}")
        sel = [] if maps is None else [maps] if isinstance(maps, MapSelection) else list(maps)
        for m in sel:
            if not isinstance(m, MapSelection):
                raise TypeError(f"maps must be MapSelection objects, got {type(m).__name__}")
            as_indices(m.layers, "layers", owner="MapSelection", n=n_layers)
            as_indices(m.heads, "heads", owner="MapSelection", n=self.heads)
        self.maps = tuple(sel)
        self.map_budget_bytes = int(map_budget_bytes)
        self.layout = layout
        self.branch_names = tuple(branches) if branches is not None else None
        self._concept_probe = None if not concepts else ConceptProbe(model, concepts, **dict(concept_options or {}))
        self._concept_entered = False
        self.estimated_bytes: dict[str, int] = {}
        self._handles: list[Handle] = []
        self._active = False
        self._result: AttentionResult | None = None
        self._rec: Recording | None = None

    # ---- context manager --------------------------------------------------------------
    def __enter__(self) -> "AttentionRecorder":
        if self._active:
            raise RuntimeError("this AttentionRecorder is already recording; nested use of one recorder is not allowed")
        ctl = ProbeController.of(self.model)
        if ctl.users(AttentionRecorder):
            raise RuntimeError(
                "another AttentionRecorder is already recording this model; exit it first (one recorder per model "
                "at a time, so nothing is recorded twice)"
            )
        self._rec = Recording(self.statistics, ctl)
        self._result = None
        self.estimated_bytes = {}
        ctl.acquire(self, layout=self.layout, branches=self.branch_names)
        self.controller = ctl
        try:
            self._handles = [
                ctl.add_call_listener(self._on_call),
                ctl.add_observer(self, [s for s in ctl.sites if s.layer in self.layers]),
            ]
            if self._concept_probe is not None:
                self._concept_probe.__enter__()
                self._concept_entered = True
        except BaseException:
            self._teardown()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown()

    def _teardown(self) -> None:
        try:
            if self._concept_entered:
                self._concept_entered = False
                self._concept_probe.__exit__(None, None, None)
        finally:
            self._remove_handles()

    def _remove_handles(self) -> None:
        try:
            for h in self._handles:
                h.remove()
        finally:
            self._handles = []
            self.controller.release(self)
            self._active = False
            self._result = assemble(self._rec, self.layers)

    @property
    def result(self) -> AttentionResult:
        """The recorded statistics (available after the ``with`` block; partial if the run raised)."""
        if self._active:
            return assemble(self._rec, self.layers)
        if self._result is None:
            raise RuntimeError("nothing recorded yet: use the recorder as `with AttentionRecorder(pipe) as rec: pipe(...)`")
        return self._result

    @property
    def concepts(self) -> ConceptMaps | None:
        """The concept maps of ``concepts=`` (None without concepts)."""
        return None if self._concept_probe is None else self._concept_probe.result

    def held_bytes(self, *names: str) -> int:
        """Bytes of recorded values held now (of the named statistics, ``"maps"`` for full maps; all by default)."""
        return 0 if self._rec is None else self._rec.held_bytes(names or None)

    # ---- per transformer call ---------------------------------------------------------
    def _on_call(self, ctx: CallContext) -> None:
        for s in self.statistics:
            s.begin(ctx)
        if ctx.step == 0 and ctx.kind == "main":
            self._check_map_selections(ctx)
        self._check_budget(ctx)
        self._rec.start_call(ctx)

    def _check_map_selections(self, ctx: CallContext) -> None:
        """Before a run computes: map steps the run does not have, or batch rows it cannot have, are refused."""
        for m in self.maps:
            late = [s for s in m.steps or () if ctx.n_steps is not None and s >= ctx.n_steps]
            if late:
                raise ValueError(f"{m}: steps {late} out of range: this run has {ctx.n_steps} denoising steps "
                                 f"(0..{ctx.n_steps - 1}); nothing would be recorded for them")
            rows = len(self._rec.row_keys) + ctx.batch * (2 if ctx.pipeline else 1)  # room for SLG's extra rows
            far = [b for b in m.batch or () if b >= rows]
            if far:
                raise ValueError(f"{m}: batch rows {far} out of range: this run has rows 0..{ctx.batch - 1} "
                                 f"({', '.join(ctx.branches)}{' + slg rows' if ctx.pipeline else ''})")

    def _check_budget(self, ctx: CallContext) -> None:
        """Full maps and word maps: whole-run estimate at a run's first call, then the running total."""
        n_image = ctx.latent_hw[0] * ctx.latent_hw[1]
        sites = {a: [s.layer for s in self.controller.sites if s.attention == a and s.layer in self.layers]
                 for a in ("attn", "attn2")}
        per_stat = {s.name: s.bytes_per_call(ctx, self.heads) * sum(len(sites[a]) for a in s.attentions)
                    for s in self.statistics}
        per_map = sum(m.bytes_per_call(n_image, ctx.n_text, ctx.batch, self.heads)
                      * len([l for l in sites[m.attention] if m.matches(ctx.step, l, m.attention)]) for m in self.maps)
        if ctx.step == 0 and ctx.kind == "main" and ctx.n_steps:
            runs = {name: b * ctx.n_steps for name, b in per_stat.items() if b}
            runs["maps"] = sum(m.estimate_bytes(ctx.n_steps, sites[m.attention], n_image, ctx.n_text, ctx.batch, self.heads)
                               for m in self.maps)
            for k, v in runs.items():
                self.estimated_bytes[k] = self.estimated_bytes.get(k, 0) + v
            total = self._rec.held_bytes(("word_map", "maps")) + sum(runs.values())
        else:
            total = self._rec.held_bytes(("word_map", "maps")) + per_map + per_stat.get("word_map", 0)
        if total > self.map_budget_bytes:
            raise MapBudgetError(
                f"the requested full attention maps and word maps need {format_bytes(total)} ({total:,} bytes; budget "
                f"{format_bytes(self.map_budget_bytes)}, {n_image} image and {ctx.n_text} text tokens, batch {ctx.batch}, "
                f"{self.heads} heads). Narrow the MapSelection (fewer steps/layers/heads/batch rows, or a text quadrant "
                f"instead of image->image), record fewer words or word_heads='mean', or raise map_budget_bytes. "
                f"Nothing recorded so far is lost: rec.result holds it."
            )

    # ---- per attention call -----------------------------------------------------------
    def observe(self, call: AttentionCall, q, k, v, out, lse) -> None:
        rec = self._rec
        nonfinite = ~torch.isfinite(lse).flatten(1).all(1)  # [rows]: the model's own attention went non-finite
        for s in self.statistics:
            if call.site.attention in s.attentions:
                value = s.compute(call, q, k, v, lse)
                if value is not None:
                    rec.add(call.site, s.name, value, nonfinite)
        for m in self.maps:
            if m.matches(call.context.step, call.site.layer, call.site.attention):
                self._record_map(m, call, q, k, lse)

    def _record_map(self, m: MapSelection, call: AttentionCall, q, k, lse) -> None:
        qs, ks = m.streams
        sl = {"image": call.image_slice, "text": call.text_slice}
        slots = self._rec.row_slots
        rows = [i for i, slot in enumerate(slots) if m.batch is None or slot in m.batch]
        if not rows:
            return
        heads = list(m.heads) if m.heads is not None else list(range(q.shape[1]))
        qq = q[rows][:, heads][:, :, sl[qs]]
        kk = k[rows][:, heads][:, :, sl[ks]]
        p = probabilities(qq, kk, lse[rows][:, heads][..., sl[qs]], call.scale)
        if call.self_only_rows and (qs, ks) == ("image", "image"):
            blank = [j for j, r in enumerate(rows) if r in call.self_only_rows]
            p[blank] = float("nan")  # PAG's perturbed row: image→image is its own key only; not a slice of this
        self._rec.add_map((call.site.layer, call.site.attention, m.quadrant), p, [slots[r] for r in rows], heads)

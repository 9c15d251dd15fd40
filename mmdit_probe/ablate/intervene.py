"""``intervene``: apply ablation specs to a pipeline or bare transformer, restore it on exit.

>>> with mp.intervene(pipe, mp.ZeroText(layers=[2, 3]), mp.KnockOut("image->text", layers=[1])):
...     ablated = pipe(prompt, generator=torch.manual_seed(0)).images[0]

Specs and user :class:`~mmdit_probe.Edit` s compose; each spec is validated (and the set checked for
contradictions) before anything runs, and run-dependent checks (step count, rows, prompt words)
happen at the start of every transformer call, before any block computes. Whole-block skips pass
diffusers' own ``skip_layers`` where the transformer takes it (SD3); other block-level specs are forward
(pre-)hooks on the blocks / their ``attn`` that read and write streams only through the family's
:class:`~mmdit_probe.families.base.BlockIO` (separate or joined streams); attention-level specs are
:class:`~mmdit_probe.Edit` s of the probe processor, so an ``AttentionRecorder`` inside the ``with`` block
records the ablated attention.
Steps are the denoising steps of each pipeline run (read from the call context).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..context import CallContext
from ..families import family_of
from ..families.base import BlockIO, call_argument, with_argument
from ..hooks import Edit, ProbeSession, model_blocks, resolve_transformer
from ..kernels import attention_with_lse
from ..layout import TokenLayout
from .conflicts import check_conflicts
from .rows import AblationError, put_rows
from .specs import AblateHeads, KnockOut, Patch, SkipLayers, Spec, ZeroText

# logit penalty (before the softmax scale) that observers see on knocked-out query/key pairs
_PENALTY = {torch.float16: 3.0e4}
_DEFAULT_PENALTY = 1.0e9


class Intervention:
    """Context manager applying ``specs`` (see :func:`intervene`)."""

    def __init__(self, model: Any, specs: Sequence[Spec | Edit], *, layout: TokenLayout | Sequence[TokenLayout] | None = None,
                 branches: Sequence[str] | None = None):
        self.model = model
        self.transformer = resolve_transformer(model)
        flat = _flatten(specs)
        self._blocks = model_blocks(self.transformer)
        self.specs = tuple(s for s in flat if isinstance(s, Spec))
        self.edits = tuple(s for s in flat if isinstance(s, Edit))
        self.layout, self.branches = layout, branches
        self._tracker: ProbeSession | None = None
        self._hooks: list[Any] = []

    # ---- enter / exit -------------------------------------------------------------------
    def __enter__(self) -> "Intervention":
        if self._tracker is not None:
            raise RuntimeError("this intervention is already active")
        check_specs(self.transformer, *self.specs)
        self._check_layout_now()
        self._tracker = ProbeSession(self.model, self, layout=self.layout, branches=self.branches,
                                     on_call=self._on_call).start()
        try:
            for spec in self.specs:
                self._install(spec)
            for edit in self.edits:
                self._tracker.add_edit(edit)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for h in reversed(self._hooks):
                h.remove()
        finally:
            self._hooks = []
            if self._tracker is not None:
                self._tracker.stop()  # removes this intervention's edits by handle, releases the controller
            self._tracker = None

    @property
    def state(self) -> CallContext | None:
        """The current transformer call's context (None between calls)."""
        return self._tracker.context if self._tracker is not None else None

    def _check_layout_now(self) -> None:
        """With an explicit layout, prompt words can be checked before any call."""
        if self.layout is None:
            return
        rows = [self.layout] if isinstance(self.layout, TokenLayout) else list(self.layout)
        for s in self.specs:
            if isinstance(s, ZeroText) and s.needs_layout:
                s.check_tokens(rows)

    def _on_call(self, ctx: CallContext) -> None:
        for s in self.specs:
            s.check_call(ctx)

    # ---- installation -------------------------------------------------------------------
    def _install(self, spec: Spec) -> None:
        tr = self.transformer
        family = family_of(tr)
        if isinstance(spec, SkipLayers):
            if spec.mode == "block" and spec.branch is None and family.skip_argument:
                self._hooks.append(tr.register_forward_pre_hook(self._skip_hook(spec), with_kwargs=True))
            elif spec.mode in ("block", "image"):
                for l in spec.layers:
                    hook = self._passthrough_hook(spec, family.block_io(tr, l))
                    self._hooks.append(self._blocks[l].register_forward_hook(hook, with_kwargs=True))
            else:
                self._add_edits(spec, _ZeroAttentionEdit, attentions=("attn", "attn2"))
        elif isinstance(spec, ZeroText):
            if spec.pooled:
                self._hooks.append(tr.register_forward_pre_hook(self._pooled_hook(spec, None), with_kwargs=True))
            else:
                for l in spec.layer_list(tr):
                    hook = self._zero_text_hook(spec, family.block_io(tr, l))
                    self._hooks.append(self._blocks[l].register_forward_pre_hook(hook, with_kwargs=True))
        elif isinstance(spec, KnockOut):
            self._add_edits(spec, _KnockOutEdit, attentions=("attn",))
        elif isinstance(spec, AblateHeads):
            self._add_edits(spec, _HeadEdit, attentions=(spec.attention,))
        elif isinstance(spec, Patch):
            if spec.stream == "pooled":
                self._hooks.append(tr.register_forward_pre_hook(self._pooled_hook(spec, spec.source), with_kwargs=True))
            for l in spec.layer_list(tr):
                block, io = self._blocks[l], family.block_io(tr, l)
                if spec.stream == "attention":
                    self._hooks.append(block.attn.register_forward_hook(self._patch_attention_hook(spec, l, io)))
                else:
                    self._hooks.append(block.register_forward_hook(self._patch_block_hook(spec, l, io)))
        else:  # pragma: no cover - Spec subclasses are all handled above
            raise TypeError(f"no installer for {type(spec).__name__}")

    def _add_edits(self, spec: Spec, kind: type, attentions: tuple[str, ...]) -> None:
        self._tracker.add_edit(kind(self, spec, spec.layer_list(self.transformer), attentions))

    def _rows(self, spec: Spec, ctx: CallContext | None = None) -> tuple[int, ...] | None:
        """Rows ``spec`` changes in the current call, or None when it is inactive."""
        ctx = self.state if ctx is None else ctx
        if ctx is None or not spec.active(ctx):
            return None
        return ctx.rows(spec.branch) or None

    # ---- hooks --------------------------------------------------------------------------
    def _skip_hook(self, spec: SkipLayers):
        def hook(module, args, kwargs):
            if self._rows(spec) is None:
                return None
            current = call_argument(args, kwargs, "skip_layers", 7)
            merged = sorted(set(current or ()) | set(spec.layers))
            return with_argument(args, kwargs, "skip_layers", 7, merged)
        return hook

    def _passthrough_hook(self, spec: SkipLayers, io: BlockIO):
        def hook(module, args, kwargs, output):
            rows = self._rows(spec)
            if rows is None:
                return None
            n_text = self.state.n_text
            image_in, text_in = io.inputs(args, kwargs, n_text)
            image, text = io.outputs(output, n_text)
            image = put_rows(image, rows, image_in)
            if spec.mode == "block" and text is not None:
                text = put_rows(text, rows, text_in)
            return io.pack(output, n_text, image, text)
        return hook

    def _zero_text_hook(self, spec: ZeroText, io: BlockIO):
        def hook(module, args, kwargs):
            rows = self._rows(spec)
            if rows is None:
                return None
            n_text = self.state.n_text
            _, text = io.inputs(args, kwargs, n_text)
            if not spec.needs_layout:
                new = put_rows(text, rows, 0.0)
            else:
                new = text.clone()
                for r in rows:
                    pos = spec.positions(self.state.layouts[r])
                    if pos:
                        new[r, pos] = 0.0
            return io.with_inputs(args, kwargs, n_text, text=new)
        return hook

    def _pooled_hook(self, spec: Spec, source: Any):
        def hook(module, args, kwargs):
            rows = self._rows(spec)
            if rows is None:
                return None
            pooled = call_argument(args, kwargs, "pooled_projections", 2)
            if pooled is None:  # a family that does not declare has_pooled = False: refused before any block runs
                raise AblationError(f"{spec.describe()}: this transformer call has no pooled text conditioning "
                                    f"(pooled_projections is None); zero or patch the text stream instead")
            value = 0.0 if source is None else self._cached(spec, source.get(self.state.step, None, "pooled"), pooled)
            return with_argument(args, kwargs, "pooled_projections", 2, put_rows(pooled, rows, value))
        return hook

    def _cached(self, spec: Patch, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if value.shape != like.shape:
            raise AblationError(
                f"{spec.describe()}: the source activation has shape {tuple(value.shape)} but this run has "
                f"{tuple(like.shape)}; patch between runs with the same batch, size, CFG and max_sequence_length"
            )
        return value.to(device=like.device, dtype=like.dtype)

    def _patch_block_hook(self, spec: Patch, layer: int, io: BlockIO):
        def hook(module, args, output):
            rows = self._rows(spec)
            if rows is None:
                return None
            n_text = self.state.n_text
            image, text = io.outputs(output, n_text)
            src = self._cached(spec, spec.source.get(self.state.step, layer, spec.stream), image if spec.stream == "image" else text)
            if spec.stream == "image":
                return io.pack(output, n_text, put_rows(image, rows, src), text)
            return io.pack(output, n_text, image, put_rows(text, rows, src))
        return hook

    def _patch_attention_hook(self, spec: Patch, layer: int, io: BlockIO):
        def hook(module, args, output):
            rows = self._rows(spec)
            if rows is None:
                return None
            n_text = self.state.n_text
            image, text = io.attention(output, n_text)
            src_image, src_text = spec.source.get(self.state.step, layer, "attention")
            image = put_rows(image, rows, self._cached(spec, src_image, image))
            text = put_rows(text, rows, self._cached(spec, src_text, text))
            return io.pack_attention(output, n_text, image, text)
        return hook


# ---- attention-level specs, as Edits ---------------------------------------------------------
class _SpecEdit(Edit):
    def __init__(self, owner: Intervention, spec: Spec, layers: tuple[int, ...], attentions: tuple[str, ...]):
        super().__init__(layers, attentions)
        self.owner, self.spec = owner, spec

    def selection(self, call) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, heads)`` index tensors this call changes, or None."""
        rows = self.owner._rows(self.spec, call.context)
        if rows is None:
            return None
        heads = getattr(self.spec, "heads", None)
        heads = range(call.heads) if heads is None else heads
        return torch.tensor(rows, dtype=torch.long), torch.tensor(list(heads), dtype=torch.long)


class _ZeroAttentionEdit(_SpecEdit):
    """``SkipLayers(mode="attention")``: the attention adds nothing to either stream."""

    def edit_streams(self, call, image, text):
        rows = self.owner._rows(self.spec, call.context)
        if rows is None:
            return image, text
        return put_rows(image, rows, 0.0), None if text is None else put_rows(text, rows, 0.0)


class _KnockOutEdit(_SpecEdit):
    """``KnockOut``: recompute the affected query rows over the allowed key stream only."""

    def _streams(self, call) -> tuple[slice, slice, slice]:
        q, k = self.spec.streams
        sl = {"image": call.image_slice, "text": call.text_slice}
        return sl[q], sl["text" if k == "image" else "image"], sl[k]

    def edit_attention(self, call, q, k, v, out, lse):
        sel = self.selection(call)
        if sel is None:
            return out, lse
        r, h = (i.to(q.device) for i in sel)
        qs, keep, _ = self._streams(call)
        sub = lambda t, s: t[r][:, h][:, :, s].contiguous()  # noqa: E731
        o, l = attention_with_lse(sub(q, qs), sub(k, keep), sub(v, keep), call.scale)
        out, lse = out.clone(), lse.clone()
        out_r, lse_r = out[r], lse[r]
        out_r[:, h, qs] = o.to(out.dtype)
        lse_r[:, h, qs] = l.to(lse.dtype)
        out[r], lse[r] = out_r, lse_r
        return out, lse

    def observed_qk(self, call, q, k):
        """Append one key feature so observers' logits carry ``-penalty`` on knocked-out pairs (exactly 0 mass)."""
        sel = self.selection(call)
        if sel is None:
            return q, k
        r, h = (i.to(q.device) for i in sel)
        qs, _, knocked = self._streams(call)
        pad = 8  # keep head dims a multiple of 8 for the GPU kernels
        qe = q.new_zeros(*q.shape[:-1], pad)
        ke = k.new_zeros(*k.shape[:-1], pad)
        qe_r = qe[r]
        qe_r[:, h, qs, 0] = -_PENALTY.get(q.dtype, _DEFAULT_PENALTY)
        qe[r] = qe_r
        ke[:, :, knocked, 0] = 1.0
        return torch.cat([q, qe], -1), torch.cat([k, ke], -1)


class _HeadEdit(_SpecEdit):
    """``AblateHeads``: zero or mean-replace head outputs ``out [B, H, N, D]``."""

    def edit_heads(self, call, out):
        sel = self.selection(call)
        if sel is None:
            return out
        r, h = (i.to(out.device) for i in sel)
        out = out.clone()
        if self.spec.mode == "zero":
            out_r = out[r]
            out_r[:, h] = 0.0
            out[r] = out_r
            return out
        state = call.context
        for branch in dict.fromkeys(state.branches[i] for i in r.tolist()):
            rows = torch.tensor([i for i in r.tolist() if state.branches[i] == branch], dtype=torch.long, device=out.device)
            mean = self.spec.reference.mean_for(state.step, call.site.layer, call.site.attention, branch)
            if mean.shape[1] != out.shape[2]:
                raise AblationError(
                    f"{self.spec.describe()}: the reference run had {mean.shape[1]} tokens here but this run has "
                    f"{out.shape[2]}; record the reference at the same image size and max_sequence_length"
                )
            out_r = out[rows]
            out_r[:, h] = mean[h].to(device=out.device, dtype=out.dtype)
            out[rows] = out_r
        return out


def _flatten(specs: Iterable[Any]) -> list[Spec | Edit]:
    flat: list[Spec | Edit] = []
    for s in specs:
        flat.extend(s if isinstance(s, (list, tuple)) else [s])
    for s in flat:
        if not isinstance(s, (Spec, Edit)):
            raise TypeError(f"intervene takes ablation specs (SkipLayers, ZeroText, KnockOut, AblateHeads, Patch) or "
                            f"Edit instances, got {type(s).__name__}")
    return flat


def check_specs(model: Any, *specs: Spec | Iterable[Spec]) -> None:
    """Validate ``specs`` against ``model`` and each other (what ``intervene`` does on entry), without running anything."""
    tr = resolve_transformer(model)
    flat = [s for s in _flatten(specs) if isinstance(s, Spec)]
    for s in flat:
        s.validate(tr)
    check_conflicts(flat, tr)


def intervene(model: Any, *specs: Spec | Edit | Iterable[Spec | Edit], layout: TokenLayout | Sequence[TokenLayout] | None = None,
              branches: Sequence[str] | None = None) -> Intervention:
    """Context manager applying ablation ``specs`` to ``model`` (pipeline or ``SD3Transformer2DModel``).

    ``specs``: built-in specs and/or your own :class:`~mmdit_probe.Edit` subclasses. Restores processors
    and hooks on exit, also after an exception. Steps are denoising steps of each pipeline run.
    ``layout`` (one ``TokenLayout`` or one per batch row) and ``branches`` (a branch name per row)
    describe the batch of a bare transformer; a pipeline's are read from its call. Lists are flattened.
    """
    return Intervention(model, _flatten(specs), layout=layout, branches=branches)

"""``ConceptProbe``: carry concept tokens through the text stream of every block, read-only.

>>> with ConceptProbe(pipe, ["dog", "sky"]) as cp:
...     pipe("a dog on the beach")
>>> cp.result.output_map("dog")        # [y, x]

The model's forward is untouched (outputs bitwise equal): the concept stream is computed on the side.
Per transformer call the stream starts as ``context_embedder(concept tokens)``; per block, a forward
pre-hook keeps the block's ``temb`` (and RoPE), the joint attention's observer (the probe controller's,
shared with :class:`~mmdit_probe.AttentionRecorder` and :func:`~mmdit_probe.intervene`) gives the image
keys, values and attention outputs exactly as the kernel saw them, the family's :class:`.path.ConceptPath`
builds the concept queries/keys/values and — in a forward hook after the block — the next concept stream.
A block that does not run (skip-layer guidance, ``SkipLayers``) leaves the concept stream as it was.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from ..context import CallContext
from ..families import family_of, resolve_transformer
from ..hooks import AttentionCall, ProbeSession
from ..maps import MapBudgetError, format_bytes
from ..selection import as_indices
from .attend import concept_attention, output_scores, per_concept
from .flux import FluxConceptPath
from .path import BlockInputs, ConceptPath, block_argument
from .record import ConceptRecording
from .result import ConceptMaps
from .sd3 import SD3ConceptPath
from .tokens import ConceptError, ConceptTokens, check_concepts, embed_tokens, plan_tokens

#: Concept paths by ``Family.name``; a new family adds its path here.
PATHS: dict[str, ConceptPath] = {"sd3": SD3ConceptPath(), "flux": FluxConceptPath()}


class ConceptProbe:
    """Context manager recording concept maps for every transformer call inside it.

    Args:
        pipe: the pipeline whose text encoders embed the concepts (SD3 / SD3.5, Flux.1).
        concepts: concept words or phrases, e.g. ``["dog", "sky"]``; none needs to be in the prompt.
        target: what to attach to: ``pipe`` (default; step and branch of each call from the pipeline's
            state) or ``pipe.transformer`` (bare transformer calls: each call is a step, rows ``branches``).
        max_sequence_length: T5 length the concepts are encoded at (default: the pipeline's default).
        clip_skip: SD3's CLIP layer, as the pipeline call's ``clip_skip``.
        layers, steps: blocks and denoising steps to record (default all).
        heads: ``"mean"`` keeps the head mean of the raw maps, ``"all"`` every head.
        budget_bytes: refuse (``MapBudgetError``, before the run's first block) maps needing more.
        branches: branch name per row for bare transformer calls.
    """

    def __init__(self, pipe: Any, concepts: Sequence[str], *, target: Any = None, max_sequence_length: int | None = None,
                 clip_skip: int | None = None, layers: int | Sequence[int] | None = None,
                 steps: int | Sequence[int] | None = None, heads: str = "mean", budget_bytes: int = 1 << 30,
                 branches: Sequence[str] | None = None):
        self.concepts = check_concepts(concepts)
        self.target = pipe if target is None else target
        self.transformer = resolve_transformer(self.target)  # TypeError naming the supported families
        if getattr(pipe, "transformer", None) is not self.transformer or not hasattr(pipe, "encode_prompt"):
            raise ConceptError("ConceptProbe needs the pipeline (its text encoders embed the concepts) as its first "
                               "argument; to probe bare transformer calls pass target=pipe.transformer")
        self.pipe, self.family = pipe, family_of(self.transformer)
        self.path = PATHS.get(self.family.name)
        if self.path is None:
            raise TypeError(f"concept maps are implemented for {', '.join(PATHS)}; {self.family.label} has no "
                            f"concept path yet (add one to mmdit_probe.concepts.probe.PATHS)")
        self.blocks = self.family.blocks(self.transformer)
        self.kinds = tuple(self.family.block_kinds(self.transformer))
        n = len(self.blocks)
        self.layers = tuple(sorted(as_indices(layers, "layers", owner="ConceptProbe", n=n) or range(n)))
        self.steps = as_indices(steps, "steps", owner="ConceptProbe")
        if heads not in ("mean", "all"):
            raise ConceptError(f"heads must be 'mean' or 'all', got {heads!r}")
        self.heads = None if heads == "mean" else tuple(range(self.transformer.config.num_attention_heads))
        if int(budget_bytes) <= 0:
            raise ConceptError(f"budget_bytes must be positive, got {budget_bytes!r}")
        self.budget_bytes, self.branches, self.clip_skip = int(budget_bytes), branches, clip_skip
        self.plan: ConceptTokens = plan_tokens(pipe, self.family, self.path, self.concepts, max_sequence_length)
        self.tokens: ConceptTokens | None = None
        self._session: ProbeSession | None = None
        self._handles: list[Any] = []
        self._rec: ConceptRecording | None = None
        self._result: ConceptMaps | None = None
        self._active = False
        self._reset_call()

    # ---- context manager ------------------------------------------------------------------
    def __enter__(self) -> "ConceptProbe":
        if self._active:
            raise RuntimeError("this ConceptProbe is already active; nested use of one probe is not allowed")
        if self.tokens is None:
            self.tokens = embed_tokens(self.pipe, self.path, self.plan, self.clip_skip)
        self._rec, self._result = ConceptRecording(), None
        self._session = ProbeSession(self.target, self, branches=self.branches, on_call=self._on_call)
        self._session.start()
        self._active = True
        try:
            ctl = self._session.controller
            last = self.layers[-1]
            self._handles.append(ctl.add_observer(self, [s for s in ctl.sites if s.attention == "attn" and s.layer <= last]))
            for layer, block in enumerate(self.blocks[: last + 1]):
                self._handles.append(block.register_forward_pre_hook(partial(self._block_pre, layer), with_kwargs=True))
                self._handles.append(block.register_forward_hook(partial(self._block_post, layer), with_kwargs=True))
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown()

    def _teardown(self) -> None:
        try:
            for h in reversed(self._handles):
                h.remove()
        finally:
            self._handles = []
            if self._session is not None:
                self._session.stop()
            self._session, self._active = None, False
            self._reset_call()
            self._result = self._assemble()

    @property
    def result(self) -> ConceptMaps:
        """The concept maps (after the ``with`` block; partial if the run raised)."""
        if self._active:
            return self._assemble()
        if self._result is None:
            raise RuntimeError("nothing recorded yet: use `with ConceptProbe(pipe, concepts) as cp: pipe(...)`")
        return self._result

    def _assemble(self) -> ConceptMaps:
        return self._rec.assemble(self.concepts, self.layers, self.kinds, self.heads, self.plan.pieces)

    # ---- per transformer call ---------------------------------------------------------------
    def _reset_call(self) -> None:
        self._x: torch.Tensor | None = None  # concept stream [B, T, C] entering the next block
        self._inputs: BlockInputs | None = None
        self._pending: tuple | None = None

    @torch.no_grad()
    def _on_call(self, ctx: CallContext) -> None:
        self._reset_call()
        if self.steps is not None and ctx.step not in self.steps:
            return
        self._check_budget(ctx)
        self._rec.start_call(ctx)
        emb = self.transformer.context_embedder
        hidden = self.tokens.hidden.to(device=emb.weight.device, dtype=emb.weight.dtype)
        self._x = emb(hidden).unsqueeze(0).expand(ctx.batch, -1, -1)
        self._weights = self.tokens.weights(device=emb.weight.device)

    def _check_budget(self, ctx: CallContext) -> None:
        n_image = ctx.latent_hw[0] * ctx.latent_hw[1]
        per_call = len(self.layers) * ctx.batch * len(self.concepts) * n_image * 4 * (2 + len(self.heads or (0,)))
        calls = 1
        if ctx.step == 0 and ctx.kind == "main" and ctx.n_steps:
            calls = len([s for s in range(ctx.n_steps) if self.steps is None or s in self.steps])
        total = self._rec.bytes + per_call * calls
        if total > self.budget_bytes:
            raise MapBudgetError(
                f"concept maps need {format_bytes(total)} ({total:,} bytes; budget {format_bytes(self.budget_bytes)}: "
                f"{len(self.layers)} layers × {ctx.batch} rows × {len(self.concepts)} concepts × {n_image} image tokens"
                f"{'' if self.heads is None else f' × {len(self.heads)} heads'} per call). Record fewer layers= or "
                f"steps=, heads='mean', or raise budget_bytes")

    @torch.compiler.disable
    @torch.no_grad()
    def _block_pre(self, layer: int, module, args, kwargs) -> None:
        if self._x is None:
            return None
        self._inputs = BlockInputs(block_argument(module, args, kwargs, "temb"),
                                   block_argument(module, args, kwargs, "image_rotary_emb"))
        return None

    @torch.no_grad()
    def observe(self, call: AttentionCall, q, k, v, out, lse) -> None:
        """The joint attention of a block: concept attention over its image keys, maps, pending stream update."""
        layer = call.site.layer
        if self._x is None or self._inputs is None:
            return
        block, kind = self.blocks[layer], self.kinds[layer]
        qkv = self.path.enter(block, kind, self._x, self._inputs)
        img = call.image_slice
        att = concept_attention(qkv.q, qkv.k, qkv.v, k[:, :, img], v[:, :, img], call.scale)
        if layer in self.layers:
            w = self._weights
            raw, mass = per_concept(att.image_probs, w, 2), per_concept(att.image_mass, w, 2)  # [B,H,C,N], [B,H,C]
            raw, mass = (raw.mean(1), mass.mean(1)) if self.heads is None else (raw.transpose(1, 2), mass.transpose(1, 2))
            self._rec.add(layer, raw, mass, output_scores(out[:, :, img], per_concept(att.out, w, 2)))
        merged = att.out.transpose(1, 2).flatten(2).to(qkv.q.dtype)  # [B, T, H·D], as the block merges heads
        self._pending = (layer, qkv, merged)

    @torch.compiler.disable
    @torch.no_grad()
    def _block_post(self, layer: int, module, args, kwargs, output) -> None:
        pending, self._pending, self._inputs = self._pending, None, None
        if pending is None or pending[0] != layer:  # the block's attention did not run: the stream passes through
            return None
        _, qkv, merged = pending
        self._x = None if layer >= self.layers[-1] else self.path.leave(module, self.kinds[layer], self._x, merged, qkv)
        return None

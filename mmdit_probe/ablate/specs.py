"""Ablation specs: frozen dataclasses that say *what* to change, *where* (layers, heads) and *when*
(steps, CFG branch). :func:`mmdit_probe.intervene` applies them.

Every spec has ``describe()`` (one line for tables and plots) and ``validate(transformer)`` (checks
indices and names against the model; ``intervene`` calls it before any compute). Selections:
``layers`` / ``heads`` / ``steps`` are ints or iterables (``None`` = all; empty = error; numpy ints
and ranges accepted), ``steps`` are denoising steps of each pipeline run (``0 … n − 1``; SLG's extra
call shares its step), ``branch`` is ``"uncond"``, ``"cond"``, ``"slg"``, ``"perturbed"`` or ``None``
(every row of every call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..context import BRANCHES, CallContext, CallContextError
from ..families import family_of, model_blocks
from ..layout import TEXT_GROUPS, TokenLayout, normalise_word
from ..maps import parse_quadrant, quadrant_name
from ..selection import SelectionError, as_indices, fmt_ints
from .cache import PATCH_STREAMS, ActivationCache, HeadMeans
from .conflicts import Touch
from .rows import AblationError

SKIP_MODES = ("block", "attention", "image")
HEAD_MODES = ("zero", "mean")
#: Coarse token-group names accepted by ``ZeroText(groups=...)`` besides the fine ``TEXT_GROUPS``.
GROUP_ALIASES: dict[str, tuple[str, ...]] = {
    "clip": ("clip_real", "clip_special", "clip_padding"),
    "t5": ("t5_real", "t5_special", "t5_padding"),
    "real": ("clip_real", "t5_real"),
    "special": ("clip_special", "t5_special"),
    "padding": ("clip_padding", "t5_padding"),
}


# ---- small helpers ----------------------------------------------------------------------
def _ints(x: int | Iterable[int] | None, what: str, spec: str) -> tuple[int, ...] | None:
    try:
        return as_indices(x, what, owner=spec)
    except SelectionError as err:
        raise AblationError(str(err)) from None


def _names(x: str | Iterable[str] | None, what: str, spec: str) -> tuple[str, ...] | None:
    if x is None:
        return None
    out = (x,) if isinstance(x, str) else tuple(x)
    if not out:
        raise AblationError(f"{spec}: empty {what} selection; pass None or at least one name")
    return tuple(dict.fromkeys(out))


def _blocks(layers: tuple[int, ...] | None) -> str:
    if layers is None:
        return "all blocks"
    return f"block{'s' if len(layers) > 1 else ''} {fmt_ints(layers)}"


def _when(steps: tuple[int, ...] | None, branch: str | None) -> str:
    s = "" if steps is None else f" at step{'s' if len(steps) > 1 else ''} {fmt_ints(steps)}"
    return s + ("" if branch is None else f" ({branch})")


def _check_range(spec: str, values: tuple[int, ...] | None, n: int, what: str) -> None:
    bad = [v for v in values or () if not 0 <= v < n]
    if bad:
        raise AblationError(f"{spec}: {what} {bad} out of range: this model has {what}s 0..{n - 1}")


def _check_pooled(transformer: torch.nn.Module, what: str, instead: str) -> None:
    """Refuse a pooled-conditioning spec on a family without pooled conditioning (``Family.has_pooled``)."""
    family = family_of(transformer)
    if family is not None and not family.has_pooled:
        raise AblationError(f"{what}: {family.label} has no pooled text conditioning ({family.transformer_class} takes "
                            f"no pooled_projections); {instead}")


class Spec:
    """Base of the ablation specs. Subclasses are frozen dataclasses."""

    name = "Spec"

    def describe(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def _init_common(self) -> None:
        for f in ("layers", "heads", "steps"):
            if hasattr(self, f):
                object.__setattr__(self, f, _ints(getattr(self, f), f, self.name))
        if getattr(self, "branch", None) not in (None,) + BRANCHES:
            raise AblationError(f"{self.name}: branch must be one of {BRANCHES} or None (every row), got {self.branch!r}")

    def validate(self, transformer: torch.nn.Module) -> None:
        """Check layer/head indices against ``transformer``; raises :class:`AblationError`."""
        _check_range(self.name, getattr(self, "layers", None), len(model_blocks(transformer)), "layer")
        _check_range(self.name, getattr(self, "heads", None), transformer.config.num_attention_heads, "head")

    def layer_list(self, transformer: torch.nn.Module) -> tuple[int, ...]:
        layers = getattr(self, "layers", None)
        return tuple(range(len(model_blocks(transformer)))) if layers is None else layers

    def active(self, ctx: CallContext) -> bool:
        return self.steps is None or ctx.step in self.steps

    def check_call(self, ctx: CallContext) -> None:
        """Checks that need the run (step count, rows); called before the transformer computes."""
        if self.steps is not None and ctx.n_steps is not None:
            bad = [s for s in self.steps if s >= ctx.n_steps]
            if bad:
                raise AblationError(
                    f"{self.describe()}: steps {bad} out of range: this run has {ctx.n_steps} denoising steps "
                    f"(steps 0..{ctx.n_steps - 1})"
                )
        if ctx.kind == "main" and self.branch not in (None, "slg") and not ctx.rows(self.branch):
            raise AblationError(
                f"{self.describe()}: branch={self.branch!r} selects no batch rows (rows are {list(ctx.branches)}); "
                f"the 'uncond' rows exist only with classifier-free guidance (guidance_scale > 1), 'perturbed' only "
                f"with PAG; pass branches=... to intervene for a bare transformer"
            )

    def touches(self, transformer: torch.nn.Module) -> list[Touch]:
        return []


# ---- the specs --------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipLayers(Spec):
    """Skip blocks ``layers``.

    ``mode="block"``: both streams pass through unchanged (exactly diffusers'
    ``transformer(..., skip_layers=layers)``; with ``branch`` set the block still runs for every row
    and the selected rows keep their inputs). ``"attention"``: the block's attention (``attn`` and, on
    SD3.5, ``attn2``) adds nothing to either stream; the MLPs still run. ``"image"``: only the image
    stream passes through unchanged; the text stream is updated as usual.
    """

    layers: Iterable[int]
    mode: str = "block"
    steps: Iterable[int] | None = None
    branch: str | None = None
    name = "SkipLayers"

    def __post_init__(self):
        if self.layers is None:
            raise AblationError("SkipLayers: name the layers to skip, e.g. SkipLayers([3])")
        self._init_common()
        if self.mode not in SKIP_MODES:
            raise AblationError(f"SkipLayers: unknown mode {self.mode!r}; use one of {SKIP_MODES}")

    def describe(self) -> str:
        what = {"block": "skip", "attention": "skip attention of", "image": "skip image stream of"}[self.mode]
        return f"{what} {_blocks(self.layers)}{_when(self.steps, self.branch)}"

    def touches(self, transformer) -> list[Touch]:
        whats = {"block": ("block",), "attention": ("attn_out", "attn2_out"), "image": ("image_out",)}[self.mode]
        return [Touch(l, w, self.steps, self.branch) for l in self.layers for w in whats]


@dataclass(frozen=True)
class ZeroText(Spec):
    """Zero the text hidden states entering blocks ``layers`` (default: every block).

    The block's ``encoder_hidden_states`` input (the text residual stream after
    ``context_embedder`` and the earlier blocks) is set to 0 for the selected batch rows: at every
    text position, or only at ``groups`` (``"clip"``, ``"t5"``, ``"padding"``, ``"special"``,
    ``"real"`` or a fine name like ``"t5_real"``) and/or at the tokens of prompt ``words`` (both
    encoders). The block then sees constant text tokens (its adaLN shift), so image tokens lose the
    prompt *in that block*; later blocks receive what this block wrote. Zeroing block 0 with every
    position is *not* the same as an empty prompt (that would feed the empty prompt's embeddings).

    ``pooled=True`` instead zeroes only the pooled CLIP conditioning (``pooled_projections``, which
    enters every block's adaLN modulation through ``temb``); it takes no layers, groups or words, and is
    refused on families without pooled conditioning (Flux.2).
    """

    layers: Iterable[int] | None = None
    groups: Iterable[str] | None = None
    words: Iterable[str] | None = None
    pooled: bool = False
    steps: Iterable[int] | None = None
    branch: str | None = None
    name = "ZeroText"

    def __post_init__(self):
        self._init_common()
        groups = _names(self.groups, "groups", self.name)
        words = _names(self.words, "words", self.name)
        if groups is not None:
            unknown = [g for g in groups if g not in GROUP_ALIASES and g not in TEXT_GROUPS]
            if unknown:
                raise AblationError(
                    f"ZeroText: unknown token group(s) {unknown}; use {', '.join(GROUP_ALIASES)} or {', '.join(TEXT_GROUPS)}"
                )
        if words is not None:
            words = tuple(normalise_word(w) for w in words)
            if not all(words):
                raise AblationError(f"ZeroText: words {self.words} contain an empty word")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "words", words)
        if self.pooled and (self.layers is not None or groups is not None or words is not None):
            raise AblationError(
                "ZeroText(pooled=True) zeroes only the pooled text conditioning and takes no layers/groups/words; "
                "compose it with a second spec, e.g. intervene(pipe, ZeroText(pooled=True), ZeroText(layers=[3]))"
            )

    @property
    def fine_groups(self) -> tuple[str, ...] | None:
        if self.groups is None:
            return None
        return tuple(dict.fromkeys(f for g in self.groups for f in GROUP_ALIASES.get(g, (g,))))

    @property
    def needs_layout(self) -> bool:
        return self.groups is not None or self.words is not None

    def describe(self) -> str:
        if self.pooled:
            return f"zero pooled text{_when(self.steps, self.branch)}"
        sel = [*(self.groups or ()), *(repr(w) for w in self.words or ())]
        what = f"text [{', '.join(sel)}]" if sel else "text"
        return f"zero {what} into {_blocks(self.layers)}{_when(self.steps, self.branch)}"

    def validate(self, transformer) -> None:
        super().validate(transformer)
        if self.pooled:
            _check_pooled(transformer, "ZeroText(pooled=True)",
                          "zero the text stream instead: ZeroText() (every block) or ZeroText(layers=[...])")

    def positions(self, layout: TokenLayout) -> list[int]:
        """Text-sequence positions (0-based within the text stream) this spec zeroes in one row."""
        start = layout.text_slice.start
        pos: set[int] = set()
        for g in self.fine_groups or ():
            pos.update(p - start for p in layout.group_positions(g))
        for w in self.words or ():
            if w in layout.words:
                pos.update(p - start for p in layout.word_positions(w))
        return sorted(pos)

    def check_call(self, ctx: CallContext) -> None:
        super().check_call(ctx)
        if not self.needs_layout or not ctx.rows(self.branch):
            return
        try:
            rows = [ctx.layout(r) for r in ctx.rows(self.branch)]
        except CallContextError as err:
            raise AblationError(f"{self.describe()}: token groups and words need the token layout; {err}") from None
        self.check_tokens(rows)

    def check_tokens(self, rows: Iterable[TokenLayout]) -> None:
        """Raise unless the words are in the prompt and the selection has tokens in some row."""
        rows = list(rows)
        for w in self.words or ():
            if not any(w in lay.words for lay in rows):
                present = list(dict.fromkeys(x for lay in rows for x in lay.words))
                raise AblationError(
                    f"{self.describe()}: word {w!r} is not in the prompt; words present: {', '.join(present) or '(none)'}"
                )
        if not any(self.positions(lay) for lay in rows):
            raise AblationError(f"{self.describe()}: selects no text tokens in this run's prompt")

    def touches(self, transformer) -> list[Touch]:
        if self.pooled:
            return [Touch(None, "pooled", self.steps, self.branch)]
        return [Touch(l, "text_in", self.steps, self.branch) for l in self.layer_list(transformer)]


@dataclass(frozen=True)
class KnockOut(Spec):
    """Remove one attention quadrant (``"image->text"``: image queries may not attend to text keys).

    In the joint attention (``attn``) of ``layers`` and ``heads``, the affected queries attend only to
    the other key stream and their attention renormalises over it; exact, without an N×N mask
    (the affected rows are recomputed by the fused kernel over the allowed keys only). The
    recorder sees the ablated attention (mass on the knocked-out quadrant is 0).
    """

    quadrant: str
    layers: Iterable[int] | None = None
    heads: Iterable[int] | None = None
    steps: Iterable[int] | None = None
    branch: str | None = None
    name = "KnockOut"

    def __post_init__(self):
        try:
            object.__setattr__(self, "quadrant", quadrant_name(*parse_quadrant(self.quadrant)))
        except ValueError as err:
            raise AblationError(f"KnockOut: {err}") from None
        self._init_common()

    @property
    def streams(self) -> tuple[str, str]:
        return parse_quadrant(self.quadrant)

    def describe(self) -> str:
        heads = "" if self.heads is None else f" heads {fmt_ints(self.heads)}"
        return f"knock out {self.quadrant} in {_blocks(self.layers)}{heads}{_when(self.steps, self.branch)}"

    def touches(self, transformer) -> list[Touch]:
        q = self.streams[0]
        return [Touch(l, f"knock:{q}", self.steps, self.branch, self.heads) for l in self.layer_list(transformer)]


@dataclass(frozen=True)
class AblateHeads(Spec):
    """Replace the outputs of ``heads`` (before the output projection) in ``layers``.

    ``mode="zero"`` sets them to 0; ``mode="mean"`` to their mean over a reference run,
    ``reference`` from :func:`mmdit_probe.record_head_means` (per step, layer, branch and token
    position, averaged over batch rows and over every reference run). ``attention="attn2"`` targets
    SD3.5's image-only attention.
    """

    layers: Iterable[int] | None = None
    heads: Iterable[int] | None = None
    mode: str = "zero"
    reference: Any = field(default=None, repr=False)
    attention: str = "attn"
    steps: Iterable[int] | None = None
    branch: str | None = None
    name = "AblateHeads"

    def __post_init__(self):
        self._init_common()
        if self.mode not in HEAD_MODES:
            raise AblationError(f"AblateHeads: unknown mode {self.mode!r}; use one of {HEAD_MODES}")
        if self.attention not in ("attn", "attn2"):
            raise AblationError(f"AblateHeads: attention must be 'attn' or 'attn2', got {self.attention!r}")
        if self.mode == "mean" and not isinstance(self.reference, HeadMeans):
            raise AblationError(
                "AblateHeads(mode='mean') needs reference=record_head_means(...) filled by a reference run: "
                "`with mp.record_head_means(pipe) as ref: pipe(prompts, ...)` then AblateHeads(..., mode='mean', reference=ref)"
            )
        if self.mode == "zero" and self.reference is not None:
            raise AblationError("AblateHeads: reference is only used with mode='mean'")

    def describe(self) -> str:
        heads = "all heads" if self.heads is None else f"head{'s' if len(self.heads) > 1 else ''} {fmt_ints(self.heads)}"
        verb = "zero" if self.mode == "zero" else "mean-ablate"
        att = "" if self.attention == "attn" else " attn2"
        return f"{verb} {heads} of {_blocks(self.layers)}{att}{_when(self.steps, self.branch)}"

    def validate(self, transformer) -> None:
        super().validate(transformer)
        if self.attention == "attn2":
            missing = [l for l in self.layer_list(transformer) if getattr(model_blocks(transformer)[l], "attn2", None) is None]
            if missing:
                have = [i for i, b in enumerate(model_blocks(transformer)) if getattr(b, "attn2", None) is not None]
                raise AblationError(f"{self.describe()}: blocks {missing} have no attn2; blocks with attn2: {have or 'none'}")
        if self.mode == "mean":
            self.reference.check(self.layer_list(transformer), self.attention, self.describe())

    def touches(self, transformer) -> list[Touch]:
        return [Touch(l, f"heads:{self.attention}", self.steps, self.branch, self.heads) for l in self.layer_list(transformer)]


@dataclass(frozen=True)
class Patch(Spec):
    """Activation patching: copy a block's ``stream`` from a recorded run (``source``) into this run.

    ``source`` comes from :func:`mmdit_probe.record_activations`. ``stream``: ``"image"`` / ``"text"``
    (the block's output hidden states), ``"attention"`` (the ``attn`` output of both streams, before the
    gate; in Flux.2's single-stream blocks it includes the parallel MLP) or ``"pooled"`` (the pooled text
    conditioning; no layers; refused on families without it). Steps are matched by
    index: step ``s`` here receives step ``s`` of the source run. The batch must match the source's.
    """

    source: Any = field(repr=False)
    layers: Iterable[int] | None = None
    steps: Iterable[int] | None = None
    stream: str = "image"
    branch: str | None = None
    name = "Patch"

    def __post_init__(self):
        self._init_common()
        if self.stream not in PATCH_STREAMS:
            raise AblationError(f"Patch: unknown stream {self.stream!r}; use one of {PATCH_STREAMS}")
        if self.stream == "pooled" and self.layers is not None:
            raise AblationError("Patch(stream='pooled') patches the model-level pooled conditioning and takes no layers")
        if not isinstance(self.source, ActivationCache):
            raise AblationError(
                "Patch: source must be the cache of mmdit_probe.record_activations(...), e.g. "
                "`with mp.record_activations(pipe) as cache: pipe(clean_prompt, ...)`"
            )

    def active(self, ctx: CallContext) -> bool:
        """Only the main call of a step: the source recorded main calls only (SLG's extra call has other rows)."""
        return ctx.kind == "main" and super().active(ctx)

    def describe(self) -> str:
        src = getattr(self.source, "name", "source")
        where = "" if self.stream == "pooled" else f" of {_blocks(self.layers)}"
        return f"patch {self.stream}{where} from {src}{_when(self.steps, self.branch)}"

    def layer_list(self, transformer) -> tuple[int, ...]:
        if self.layers is not None or self.stream == "pooled":
            return self.layers or ()
        blocks = model_blocks(transformer)
        return tuple(i for i, b in enumerate(blocks) if not (self.stream == "text" and getattr(b, "context_pre_only", False)))

    def validate(self, transformer) -> None:
        super().validate(transformer)
        if self.stream == "pooled":
            _check_pooled(transformer, "Patch(stream='pooled')",
                          "patch the text stream instead: Patch(cache, layers=[...], stream='text')")
        if self.stream == "text":
            last = [l for l in self.layer_list(transformer) if getattr(model_blocks(transformer)[l], "context_pre_only", False)]
            if last:
                raise AblationError(
                    f"{self.describe()}: block {last} is context_pre_only (its text output is discarded); "
                    f"patch the text stream of blocks 0..{len(model_blocks(transformer)) - 2}"
                )
        self.source.check(self.stream, self.layer_list(transformer), self.steps, self.describe())

    def touches(self, transformer) -> list[Touch]:
        what = {"image": "image_out", "text": "text_out", "attention": "attn_out", "pooled": "pooled"}[self.stream]
        if self.stream == "pooled":
            return [Touch(None, what, self.steps, self.branch)]
        return [Touch(l, what, self.steps, self.branch) for l in self.layer_list(transformer)]

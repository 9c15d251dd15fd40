"""``AttentionRecorder``: record exact per-head attention statistics of every MMDiT block.

>>> with AttentionRecorder(pipe) as rec:
...     pipe(prompt, num_inference_steps=4)
>>> rec.result.to_dataframe()          # step, timestep, layer, attention, batch, branch, head, query, key, mass

Default cost: one extra fused-kernel pass over the text keys per attention call; memory
``O(steps × layers × batch × heads)``. Everything else is opt-in.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from .capture import PromptCapture
from .layout import KEY_GROUPS, TokenLayout, normalise_word, stream_slices
from .maps import MapBudgetError, MapSelection, format_bytes
from .processors import AttentionCall, CallInfo, ProbeController, resolve_transformer
from .result import AttentionResult, assemble_result
from .stats import complement_mass, entropy, key_column_mass, key_set_mass, lse_over_keys, probabilities


class AttentionRecorder:
    """Context manager that records attention statistics for every transformer call.

    Args:
        model: a ``StableDiffusion3Pipeline`` or an ``SD3Transformer2DModel``.
        layers: block indices to record (default all).
        groups: also record masses over the fine key groups (CLIP/T5 × real/special/padding).
        words: per-word image→text maps: ``True`` for every prompt word, or a list of words.
        word_heads: ``"all"`` keeps every head of the word maps, ``"mean"`` their mean.
        entropy: attention entropy per query group (one extra fused pass).
        key_mass: attention received by each key token, summed over image / text queries.
        maps: ``MapSelection``\\ (s) of exact full softmax maps to keep.
        map_budget_bytes: refuse map selections needing more than this (checked before allocating).
        layout: ``TokenLayout`` (or one per batch row) when recording a bare transformer.
        branches: branch name per batch row for a bare transformer (default all ``"cond"``).
    """

    def __init__(
        self,
        model: Any,
        *,
        layers: Iterable[int] | None = None,
        groups: bool = False,
        words: bool | Sequence[str] = False,
        word_heads: str = "all",
        entropy: bool = False,
        key_mass: bool = False,
        maps: MapSelection | Sequence[MapSelection] | None = None,
        map_budget_bytes: int = 1 << 30,
        layout: TokenLayout | Sequence[TokenLayout] | None = None,
        branches: Sequence[str] | None = None,
    ):
        self.model = model
        n_layers = len(resolve_transformer(model).transformer_blocks)  # validates the model class now
        self.layers = tuple(range(n_layers)) if layers is None else tuple(int(i) for i in layers)
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad or not self.layers:
            raise ValueError(f"layer index {bad or '(empty)'} out of range: this model has layers 0..{n_layers - 1}")
        if word_heads not in ("all", "mean"):
            raise ValueError(f"word_heads must be 'all' or 'mean', got {word_heads!r}")
        self.groups, self.word_heads = bool(groups), word_heads
        self.words = words if isinstance(words, bool) else tuple(words)
        self.entropy, self.key_mass = bool(entropy), bool(key_mass)
        sel = [] if maps is None else [maps] if isinstance(maps, MapSelection) else list(maps)
        for m in sel:
            if not isinstance(m, MapSelection):
                raise TypeError(f"maps must be MapSelection objects, got {type(m).__name__}")
            for l in m.layers or ():
                if not 0 <= l < n_layers:
                    raise ValueError(f"map selection layer {l} out of range: this model has layers 0..{n_layers - 1}")
        self.maps = tuple(sel)
        self.map_budget_bytes = int(map_budget_bytes)
        self.layout = layout
        self.branch_names = tuple(branches) if branches is not None else None
        self._active = False
        self._result: AttentionResult | None = None
        self._reset()

    # ---- context manager --------------------------------------------------------------
    def _reset(self) -> None:
        self._records: list[tuple[int, AttentionCall, dict[str, torch.Tensor]]] = []
        self._maps: dict[tuple[int, int, str, str], torch.Tensor] = {}
        self._map_meta: dict[tuple[int, int, str, str], dict] = {}
        self._calls: dict[int, CallInfo] = {}
        self._layouts: dict[int, list[TokenLayout] | None] = {}
        self._branches: dict[int, list[str]] = {}
        self._word_list: tuple[str, ...] | None = None
        self._map_bytes = 0
        self._offset = 0

    def __enter__(self) -> "AttentionRecorder":
        if self._active:
            raise RuntimeError("this AttentionRecorder is already recording; nested use of one recorder is not allowed")
        ctl = ProbeController.of(self.model)
        if ctl.users(AttentionRecorder):
            raise RuntimeError(
                "another AttentionRecorder is already recording this model; exit it first (one recorder per model "
                "at a time, so nothing is recorded twice)"
            )
        self._reset()
        self._result = None
        ctl.acquire(self)
        self.controller = ctl
        self._offset = ctl.call_index + 1
        self._capture = PromptCapture(self.model) if hasattr(self.model, "transformer") else None
        try:
            if self._capture is not None:
                self._capture.__enter__()
            ctl.add_call_listener(self._on_call)
            for key, proc in ctl.processors.items():
                if proc.site.layer in self.layers:
                    proc.observers.append(_Observer(self))
        except BaseException:
            self._teardown()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown()

    def _teardown(self) -> None:
        try:
            if self._capture is not None:
                self._capture.__exit__(None, None, None)
            self.controller.remove_listener(self._on_call)
        finally:
            self.controller.release(self)
            self._active = False
            self._result = self._assemble()

    @property
    def result(self) -> AttentionResult:
        """The recorded statistics (available after the ``with`` block; partial if the run raised)."""
        if self._active:
            return self._assemble()
        if self._result is None:
            raise RuntimeError("nothing recorded yet: use the recorder as `with AttentionRecorder(pipe) as rec: pipe(...)`")
        return self._result

    # ---- per transformer call ---------------------------------------------------------
    def _on_call(self, info: CallInfo) -> None:
        step = info.call - self._offset
        self._calls[step] = info
        layouts = self._row_layouts(info)
        self._layouts[step] = layouts
        self._branches[step] = self._row_branches(info.batch)
        if self.words and self._word_list is None:
            self._word_list = self._resolve_words(layouts)
        if (self.groups or self.words) and layouts is None:
            raise ValueError(
                "group masses and word maps need the token layout: call the pipeline with a prompt (not only "
                "prompt_embeds), or pass layout=TokenLayout.from_prompt(pipe, prompt, ...) to AttentionRecorder"
            )
        if self.maps:
            self._check_map_budget(step, info)

    def _row_layouts(self, info: CallInfo) -> list[TokenLayout] | None:
        if self.layout is not None:
            rows = [self.layout] * info.batch if isinstance(self.layout, TokenLayout) else list(self.layout)
            if len(rows) != info.batch:
                raise ValueError(f"layout has {len(rows)} rows but the transformer batch is {info.batch}")
            return rows
        if self._capture is not None:
            return self._capture.row_layouts(info.batch, info.latent_hw, info.n_text)
        return None

    def _row_branches(self, batch: int) -> list[str]:
        if self.branch_names is not None:
            if len(self.branch_names) != batch:
                raise ValueError(f"branches has {len(self.branch_names)} names but the batch is {batch}")
            return list(self.branch_names)
        return self._capture.branches(batch) if self._capture is not None else ["cond"] * batch

    def _resolve_words(self, layouts: list[TokenLayout] | None) -> tuple[str, ...]:
        if layouts is None:
            return ()
        present: dict[str, None] = {}
        for lay in layouts:
            for w in lay.words:
                present.setdefault(w, None)
        if self.words is True:
            return tuple(present)
        missing = [w for w in self.words if normalise_word(w) not in present]
        if missing:
            raise KeyError(f"word(s) {missing} not in the prompt; words present: {', '.join(present)}")
        return tuple(normalise_word(w) for w in self.words)

    def _check_map_budget(self, step: int, info: CallInfo) -> None:
        sched = getattr(getattr(self.model, "scheduler", None), "timesteps", None)
        n_steps = len(sched) if sched is not None and step == 0 else None
        n_image = info.latent_hw[0] * info.latent_hw[1]
        heads = self.controller.transformer.config.num_attention_heads
        site_layers = {a: [s.layer for s in self.controller.sites if s.attention == a and s.layer in self.layers]
                       for a in ("attn", "attn2")}
        if n_steps is not None:  # whole-run estimate before anything is allocated
            total = sum(m.estimate_bytes(n_steps, site_layers[m.attention], n_image, info.n_text, info.batch, heads)
                        for m in self.maps)
        else:
            total = self._map_bytes + sum(
                m.bytes_per_call(n_image, info.n_text, info.batch, heads)
                * len([l for l in site_layers[m.attention] if m.matches(step, l, m.attention)])
                for m in self.maps
            )
        if total > self.map_budget_bytes:
            raise MapBudgetError(
                f"the requested full attention maps need {format_bytes(total)} ({total:,} bytes; budget {format_bytes(self.map_budget_bytes)}, "
                f"{n_image} image and {info.n_text} text tokens, batch {info.batch}, {heads} heads). Narrow the "
                f"MapSelection (fewer steps/layers/heads/batch rows, or a text quadrant instead of image->image) or "
                f"raise map_budget_bytes. Nothing recorded so far is lost: rec.result holds it."
            )

    # ---- per attention call -----------------------------------------------------------
    def observe(self, call: AttentionCall, q, k, v, out, lse) -> None:
        step = call.call - self._offset
        rec: dict[str, torch.Tensor] = {}
        s, img, txt = call.scale, call.image_slice, call.text_slice
        B, H = q.shape[0], q.shape[1]
        nan = torch.full((B, H), float("nan"), device=q.device)
        if call.n_text:
            lse_text = lse_over_keys(q, k[:, :, txt], s)
            to_text, to_image = key_set_mass(lse_text, lse), complement_mass(lse_text, lse)
            rec["mass"] = torch.stack([
                torch.stack([to_image[..., img].mean(-1), to_text[..., img].mean(-1)], -1),
                torch.stack([to_image[..., txt].mean(-1), to_text[..., txt].mean(-1)], -1),
            ], -2)
        else:
            to_image = torch.ones_like(lse)  # attn2: image-only, all mass on image keys
            rec["mass"] = torch.full((B, H, 2, 2), float("nan"), device=q.device)
            rec["mass"][..., 0, 0] = 1.0
        layouts = self._layouts.get(step)
        if self.groups:
            rec["group_mass"] = self._group_mass(call, q, k, lse, to_image, layouts)
        if self.words and self._word_list:
            rec["word_map"] = self._word_maps(call, q, k, lse, layouts)
        if self.entropy:
            h = entropy(q, k, lse, s)
            rec["entropy"] = torch.stack([h[..., img].mean(-1), h[..., txt].mean(-1) if call.n_text else nan], -1)
        if self.key_mass:
            rec["key_mass"] = self._key_mass(call, q, k, lse, self._calls[step].n_text)
        for m in self.maps:
            if m.matches(step, call.site.layer, call.site.attention):
                self._record_map(m, step, call, q, k, lse)
        self._records.append((step, call, rec))

    def _key_mass(self, call, q, k, lse, n_text_joint: int) -> torch.Tensor:
        """``[B, H, 2, n_joint]``: column sums over image / text queries, at joint key positions."""
        img, txt, s = call.image_slice, call.text_slice, call.scale
        from_image = key_column_mass(q[:, :, img], k, lse[..., img], s)
        if call.n_text:
            return torch.stack([from_image, key_column_mass(q[:, :, txt], k, lse[..., txt], s)], -2)
        # attn2 is image-only: place its columns at the image positions of the joint sequence
        out = torch.full((*q.shape[:2], 2, call.n_image + n_text_joint), float("nan"), device=q.device)
        out[:, :, 0, stream_slices(call.order, call.n_image, n_text_joint)["image"]] = from_image
        return out

    def _group_mass(self, call, q, k, lse, to_image, layouts) -> torch.Tensor:
        B, H = q.shape[:2]
        img, txt = call.image_slice, call.text_slice
        out = torch.full((B, H, 2, len(KEY_GROUPS)), float("nan"), device=q.device)
        out[:, :, 0, 0] = to_image[..., img].mean(-1)
        if not call.n_text:
            return out
        out[:, :, 1, 0] = to_image[..., txt].mean(-1)
        for gi, group in enumerate(KEY_GROUPS[1:], start=1):
            for rows, pos in _rows_by_positions(layouts, lambda lay: lay.group_positions(group)).items():
                r = list(rows)
                if not pos:
                    out[r, :, :, gi] = 0.0
                    continue
                m = key_set_mass(lse_over_keys(q[r], k[r][:, :, list(pos)], call.scale), lse[r])
                out[r, :, 0, gi] = m[..., img].mean(-1)
                out[r, :, 1, gi] = m[..., txt].mean(-1)
        return out

    def _word_maps(self, call, q, k, lse, layouts) -> torch.Tensor:
        """``[B, heads|1, words, n_image]``: image→word mass, from one small ``q_img·k_wordsᵀ`` block per row group.

        Only the word tokens' columns are formed (``n_image × n_word_tokens`` per head, chunked over
        queries to stay under ``_WORD_BLOCK_BYTES``), never the image→image block.
        """
        B, H = q.shape[:2]
        img = call.image_slice
        words = self._word_list or ()
        heads = H if self.word_heads == "all" else 1
        out = torch.full((B, heads, len(words), call.n_image), float("nan"), device=q.device)
        if not call.n_text:
            return out
        per_row = _rows_by_positions(layouts, lambda lay: tuple(tuple(_safe_word_positions(lay, w)) for w in words))
        for rows, word_pos in per_row.items():
            cols = [p for pos in word_pos for p in pos]
            if not cols:
                continue
            r = list(rows)
            qi, kw, lse_i = q[r][:, :, img].float(), k[r][:, :, cols].float(), lse[r][..., img]
            chunk = max(1, _WORD_BLOCK_BYTES // max(1, 4 * len(r) * H * len(cols)))
            for start in range(0, call.n_image, chunk):
                sl = slice(start, start + chunk)
                logits = torch.matmul(qi[:, :, sl], kw.transpose(-1, -2)) * call.scale  # [b, H, chunk, cols]
                first = 0
                for wi, pos in enumerate(word_pos):
                    if pos:
                        lse_w = torch.logsumexp(logits[..., first : first + len(pos)], dim=-1)
                        m = torch.exp(lse_w - lse_i[..., sl])
                        out[r, :, wi, sl] = m if heads == H else m.mean(1, keepdim=True)
                    first += len(pos)
        return out

    def _record_map(self, m: MapSelection, step, call, q, k, lse) -> None:
        qs, ks = m.streams
        sl = {"image": call.image_slice, "text": call.text_slice}
        rows = list(m.batch) if m.batch is not None else list(range(q.shape[0]))
        heads = list(m.heads) if m.heads is not None else list(range(q.shape[1]))
        if max(rows) >= q.shape[0] or max(heads) >= q.shape[1]:
            raise ValueError(f"map selection batch {rows} / heads {heads} out of range for batch {q.shape[0]}, heads {q.shape[1]}")
        qq = q[rows][:, heads][:, :, sl[qs]]
        kk = k[rows][:, heads][:, :, sl[ks]]
        p = probabilities(qq, kk, lse[rows][:, heads][..., sl[qs]], call.scale)
        key = (step, call.site.layer, call.site.attention, m.quadrant)
        self._maps[key] = p
        self._map_meta[key] = {"batch": rows, "heads": heads}
        self._map_bytes += p.numel() * 4

    # ---- result -----------------------------------------------------------------------
    def _assemble(self) -> AttentionResult:
        return assemble_result(self)


_WORD_BLOCK_BYTES = 64 << 20  # cap on the q_img·k_wordsᵀ block formed at once


class _Observer:
    """Per-processor handle that forwards to the recorder (``owner`` lets the controller detach it)."""

    def __init__(self, owner: AttentionRecorder):
        self.owner = owner

    def observe(self, call, q, k, v, out, lse) -> None:
        self.owner.observe(call, q, k, v, out, lse)


def _safe_word_positions(layout: TokenLayout, word: str) -> list[int]:
    try:
        return layout.word_positions(word)
    except KeyError:
        return []


def _rows_by_positions(layouts: list[TokenLayout] | None, fn) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Group batch rows whose position lists are equal, so each distinct set is one kernel call."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, lay in enumerate(layouts or []):
        groups.setdefault(tuple(fn(lay)), []).append(row)
    return {tuple(rows): pos for pos, rows in groups.items()}

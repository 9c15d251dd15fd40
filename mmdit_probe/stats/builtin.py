"""The built-in statistics: quadrant mass, key-group mass, entropy, key-column mass, word maps.

All exact from the fused kernel's log-sum-exp (design.md §2); none forms the N×N matrix. Rows in
``call.self_only_rows`` (PAG's perturbed row) are exact for mass, group mass and word maps; entropy
and key-column mass are NaN there (their identities assume every key is visible).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..context import CallContext, CallContextError
from ..kernels import complement_mass, entropy, key_column_mass, key_set_mass, lse_over_keys
from ..layout import KEY_GROUPS, QUERY_GROUPS, TokenLayout, WordTruncatedError, normalise_word, stream_slices
from .statistic import Statistic
from .streams import context_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..hooks import AttentionCall

_WORD_BLOCK_BYTES = 64 << 20  # cap on the q_img·k_wordsᵀ block formed at once


def _nan(*shape: int, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=device)


def _masses(call: "AttentionCall", q, k, lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: mass on image keys and on text keys, ``[B, H, N]`` each."""
    if not call.n_text:
        return torch.ones_like(lse), torch.zeros_like(lse)
    lse_text = lse_over_keys(q, k[:, :, call.text_slice], call.scale)
    return complement_mass(lse_text, lse), key_set_mass(lse_text, lse)


class Mass(Statistic):
    """Quadrant mass ``[B, H, query, key]``: mean over the query group of the probability on the key group."""

    name, dims = "mass", ("head", "query", "key")

    def coords(self):
        return {"query": QUERY_GROUPS, "key": QUERY_GROUPS}

    def compute(self, call, q, k, v, lse):
        img, txt = call.image_slice, call.text_slice
        to_image, to_text = _masses(call, q, k, lse)
        if not call.n_text:  # attn2: image-only, all mass on image keys (where the model's attention is finite)
            out = _nan(*q.shape[:2], 2, 2, device=q.device)
            out[..., 0, 0] = torch.where(torch.isfinite(lse).all(-1), 1.0, float("nan"))
            return out
        return torch.stack([
            torch.stack([to_image[..., img].mean(-1), to_text[..., img].mean(-1)], -1),
            torch.stack([to_image[..., txt].mean(-1), to_text[..., txt].mean(-1)], -1),
        ], -2)


class Entropy(Statistic):
    """Attention entropy (nats) per query group, ``[B, H, query]``."""

    name, dims = "entropy", ("head", "query")

    def coords(self):
        return {"query": QUERY_GROUPS}

    def compute(self, call, q, k, v, lse):
        h = entropy(q, k, lse, call.scale)
        nan = _nan(*q.shape[:2], device=q.device)
        out = torch.stack([h[..., call.image_slice].mean(-1), h[..., call.text_slice].mean(-1) if call.n_text else nan], -1)
        return _blank_rows(out, call.self_only_rows)


class KeyMass(Statistic):
    """Attention each key token receives, summed over image / text queries: ``[B, H, query, key_token]``
    at joint positions (attn2's columns placed at the image positions)."""

    name, dims = "key_mass", ("head", "query", "key_token")

    def coords(self):
        return {"query": QUERY_GROUPS}

    def compute(self, call, q, k, v, lse):
        img, txt, s = call.image_slice, call.text_slice, call.scale
        from_image = key_column_mass(q[:, :, img], k, lse[..., img], s)
        if call.n_text:
            out = torch.stack([from_image, key_column_mass(q[:, :, txt], k, lse[..., txt], s)], -2)
            return _blank_rows(out, call.self_only_rows)
        n_text = call.context.n_text
        out = _nan(*q.shape[:2], 2, call.n_image + n_text, device=q.device)
        out[:, :, 0, stream_slices(call.order, call.n_image, n_text)["image"]] = from_image
        return out


class GroupMass(Statistic):
    """Mass on each key group (image, CLIP/T5 × real/special/padding): ``[B, H, query, key_group]``."""

    name, dims = "group_mass", ("head", "query", "key_group")

    def coords(self):
        return {"query": QUERY_GROUPS, "key_group": KEY_GROUPS}

    def __init__(self):
        self._onehot: torch.Tensor | None = None  # this transformer call's [B, n_text, G] group matrix

    def begin(self, context: CallContext) -> None:
        """Build the call's group matrix once for all its attention calls; every row needs its layout (a clear
        error before compute)."""
        onehot = torch.zeros(context.batch, context.n_text, len(KEY_GROUPS) - 1)
        for row in range(context.batch):
            lay = context.layout(row)
            start = lay.text_slice.start
            for gi, group in enumerate(KEY_GROUPS[1:]):
                onehot[row, [p - start for p in lay.group_positions(group)], gi] = 1.0
        self._onehot = onehot

    def compute(self, call, q, k, v, lse):
        """Image-key mass from the LSEs; text-group masses from one chunked ``q·k_textᵀ`` pass (text keys
        only, never ``N×N``) summed into the groups by the call's per-row one-hot matrix."""
        B, H = q.shape[:2]
        img, txt = call.image_slice, call.text_slice
        to_image, _ = _masses(call, q, k, lse)
        out = _nan(B, H, 2, len(KEY_GROUPS), device=q.device)
        out[:, :, 0, 0] = to_image[..., img].mean(-1)
        if not call.n_text:
            return out
        out[:, :, 1, 0] = to_image[..., txt].mean(-1)
        if self._onehot.device != q.device:  # once per transformer call
            self._onehot = self._onehot.to(q.device)
        per_query = text_key_sums(q, k[:, :, txt], lse, call.scale, self._onehot)  # [B, H, N, G]
        out[:, :, 0, 1:] = per_query[:, :, img].mean(-2)
        out[:, :, 1, 1:] = per_query[:, :, txt].mean(-2)
        return out


def text_key_sums(q: torch.Tensor, k_text: torch.Tensor, lse: torch.Tensor, scale: float,
                  onehot: torch.Tensor) -> torch.Tensor:
    """``Σ_{t ∈ g} P[i, t]`` per query ``i`` and key set ``g``: ``[B, H, N, G]`` (fp32).

    ``q [B, H, N, D]``, ``k_text [B, H, T, D]``, ``lse [B, H, N]`` (over all keys), ``onehot [B, T, G]``.
    ``P[i, t] = exp(s·q_i·k_t − LSE_i)`` is formed for the ``T`` text keys in query blocks of at most
    ``_WORD_BLOCK_BYTES``; rows that attend nowhere (``LSE = −inf``) get 0.
    """
    B, H, N = q.shape[:3]
    kt = k_text.float().transpose(-1, -2)
    weights = onehot.unsqueeze(1)  # [B, 1, T, G]
    chunk = max(1, _WORD_BLOCK_BYTES // max(1, 4 * B * H * k_text.shape[-2]))
    parts = []
    for start in range(0, N, chunk):
        sl = slice(start, start + chunk)
        lse_c = lse[..., sl, None]
        p = torch.exp(torch.matmul(q[:, :, sl].float(), kt) * scale - lse_c).masked_fill(lse_c == float("-inf"), 0.0)
        parts.append(torch.matmul(p, weights))
    return torch.cat(parts, dim=2)


class WordMap(Statistic):
    """Image→word mass over the image tokens, ``[B, word, image_token]`` (head mean) or
    ``[B, H, word, image_token]`` (``heads="all"``); joint attention only (no attn2 slot).

    ``words``: ``True`` for every word of the prompts, or a list. Words are fixed at the first call.
    """

    name, attentions = "word_map", ("attn",)

    def __init__(self, words: bool | Sequence[str] = True, heads: str = "mean"):
        if heads not in ("all", "mean"):
            raise ValueError(f"word_heads must be 'all' or 'mean', got {heads!r}")
        self.requested = words if isinstance(words, bool) else tuple(words)
        self.heads = heads
        self.dims = ("head", "word", "image_token") if heads == "all" else ("word", "image_token")
        self.words: tuple[str, ...] | None = None

    def coords(self):
        return {"word": self.words or ()}

    def begin(self, context: CallContext) -> None:
        layouts = [context.layout(r) for r in range(context.batch)]  # clear error for rows without a prompt
        if self.words is None:
            self.words = self._resolve(layouts)

    def _resolve(self, layouts: list[TokenLayout]) -> tuple[str, ...]:
        present: dict[str, None] = {}
        for lay in layouts:
            for w in lay.words:
                present.setdefault(w, None)
        if self.requested is True:
            return tuple(present)
        missing = [w for w in self.requested if normalise_word(w) not in present]
        for lay in layouts:  # a word the encoders cut off says so (WordTruncatedError), not "not in the prompt"
            for w in missing:
                try:
                    lay.word_positions(w)
                except WordTruncatedError:
                    raise
                except KeyError:
                    pass
        if missing:
            raise KeyError(f"word(s) {missing} not in the prompt; words present: {', '.join(present)}")
        return tuple(normalise_word(w) for w in self.requested)

    def bytes_per_call(self, context: CallContext, heads: int) -> int:
        n_image = context.latent_hw[0] * context.latent_hw[1]
        return self.estimate_bytes(1, 1, context.batch, len(self.words or ()), n_image, heads if self.heads == "all" else 1)

    @staticmethod
    def estimate_bytes(steps: int, layers: int, rows: int, words: int, image_tokens: int, heads: int = 1) -> int:
        """fp32 bytes the word maps of a run hold: ``steps × layers × rows × heads × words × image_tokens × 4``.

        SD3.5-medium at 1024² (4096 image tokens), 28 steps, CFG (2 rows), 24 layers, 10 words:
        ``WordMap.estimate_bytes(28, 24, 2, 10, 4096)`` = 220,200,960 bytes (210 MiB) as the head mean
        (the default); ``heads=24`` (``word_heads="all"``) = 4.9 GiB.
        """
        return 4 * steps * layers * rows * heads * words * image_tokens

    def compute(self, call, q, k, v, lse):
        """Generated image queries → word keys (a Kontext context image's tokens are not image tokens here)."""
        if not call.n_text or not self.words:
            return None
        n_image = call.n_image - context_tokens(call)
        return self.maps(call, q, k, lse, slice(call.image_slice.start, call.image_slice.start + n_image))

    def maps(self, call, q, k, lse, queries: slice) -> torch.Tensor:
        """Word maps of the query positions ``queries``: one small ``q·k_wordsᵀ`` block per row group (chunked
        under ``_WORD_BLOCK_BYTES``), ``[B, (H,) word, query]``."""
        B, H = q.shape[:2]
        n_query = queries.stop - queries.start
        words = self.words
        out = _nan(B, H if self.heads == "all" else 1, len(words), n_query, device=q.device)
        per_row = rows_by_positions(call.context.layouts,
                                    lambda lay: tuple(tuple(_safe_word_positions(lay, w)) for w in words))
        for rows, word_pos in per_row.items():
            cols = [p for pos in word_pos for p in pos]  # joint positions
            if not cols:
                continue
            r = list(rows)
            qi, kw, lse_i = q[r][:, :, queries].float(), k[r][:, :, cols].float(), lse[r][..., queries]
            chunk = max(1, _WORD_BLOCK_BYTES // max(1, 4 * len(r) * H * len(cols)))
            for start in range(0, n_query, chunk):
                sl = slice(start, start + chunk)
                logits = torch.matmul(qi[:, :, sl], kw.transpose(-1, -2)) * call.scale  # [b, H, chunk, cols]
                first = 0
                for wi, pos in enumerate(word_pos):
                    if pos:
                        m = key_set_mass(torch.logsumexp(logits[..., first : first + len(pos)], dim=-1), lse_i[..., sl])
                        out[r, :, wi, sl] = m if self.heads == "all" else m.mean(1, keepdim=True)
                    first += len(pos)
        return out if self.heads == "all" else out[:, 0]


def _blank_rows(t: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    if rows:
        t = t.clone()
        t[list(rows)] = float("nan")
    return t


def _safe_word_positions(layout: TokenLayout, word: str) -> list[int]:
    try:
        return layout.word_positions(word)
    except KeyError:
        return []


def rows_by_positions(layouts, fn) -> dict[tuple[int, ...], tuple]:
    """Group batch rows whose position lists are equal, so each distinct set is one kernel call."""
    groups: dict[tuple, list[int]] = {}
    for row, lay in enumerate(layouts or []):
        if lay is None:
            raise CallContextError(f"batch row {row} has no token layout (the pipeline was given embeddings for it)")
        groups.setdefault(tuple(fn(lay)), []).append(row)
    return {tuple(rows): pos for pos, rows in groups.items()}

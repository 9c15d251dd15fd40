"""Statistics over three token groups: text, the generated image, and a Flux Kontext context image.

Kontext appends the context image's tokens to the image stream, so each attention call sees
``[text, image, context]`` (the split: :mod:`.streams`). Both statistics are exact from the fused
kernel's log-sum-exp, like the built-ins, and work on calls without a context image too (``context``
queries NaN, ``context`` keys mass 0).

>>> with mp.AttentionRecorder(kontext_pipe, statistics=[ContextMass(), ContextWordMap()]) as rec: ...
>>> rec.result.to_dataframe("context_mass")        # query, key in text / image / context
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..context import CallContext
from ..kernels import complement_mass, key_set_mass, lse_over_keys
from .builtin import WordMap
from .statistic import Statistic
from .streams import STREAM_GROUPS, context_tokens, stream_split

__all__ = ["STREAM_GROUPS", "ContextMass", "ContextWordMap", "context_tokens", "stream_split"]


class ContextMass(Statistic):
    """Mass between text, generated image and context image: ``[B, H, query, key]`` with query and key in
    :data:`STREAM_GROUPS`; the mean over the query group's tokens of the probability on the key group
    (each query row sums to 1; a group absent from the call has NaN queries and 0 key mass)."""

    name, dims, attentions = "context_mass", ("head", "query", "key"), ("attn",)

    def coords(self):
        return {"query": STREAM_GROUPS, "key": STREAM_GROUPS}

    def compute(self, call, q, k, v, lse):
        sl = stream_split(call)
        text, context = k[:, :, sl["text"]], k[:, :, sl["context"]]  # an empty key set has LSE −inf: mass 0
        to = {"text": key_set_mass(lse_over_keys(q, text, call.scale), lse),
              "context": key_set_mass(lse_over_keys(q, context, call.scale), lse),
              "image": complement_mass(lse_over_keys(q, torch.cat([text, context], 2), call.scale), lse)}  # expm1
        out = torch.full((*q.shape[:2], 3, 3), float("nan"), device=q.device)
        for qi, group in enumerate(STREAM_GROUPS):
            rows = sl[group]
            if rows.stop > rows.start:
                out[:, :, qi] = torch.stack([to[key][..., rows].mean(-1) for key in STREAM_GROUPS], -1)
        return out


class ContextWordMap(WordMap):
    """Context→word mass over the context image's tokens, ``[B, word, context_token]`` (head mean) or
    ``[B, H, word, context_token]`` (``heads="all"``): which context tokens read which prompt word.

    Words as :class:`~mmdit_probe.WordMap` (``True``: every prompt word, or a list). Calls without a context
    image record nothing. Lay a map out with :func:`mmdit_probe.context_word_map`.
    """

    name, attentions = "context_word_map", ("attn",)

    def __init__(self, words: bool | Sequence[str] = True, heads: str = "mean"):
        super().__init__(words, heads)
        self.dims = tuple("context_token" if d == "image_token" else d for d in self.dims)

    def bytes_per_call(self, context: CallContext, heads: int) -> int:
        n = max((lay.n_context for lay in context.layouts if lay is not None), default=0)
        return self.estimate_bytes(1, 1, context.batch, len(self.words or ()), n, heads if self.heads == "all" else 1)

    def compute(self, call, q, k, v, lse):
        """The word-map kernel run on the context queries."""
        sl = stream_split(call)
        n_context = sl["context"].stop - sl["context"].start
        if not n_context or not call.n_text:
            return None
        return self.maps(call, q, k, lse, sl["context"])

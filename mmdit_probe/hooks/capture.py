"""Which prompt each transformer batch row carries, matched by value, never by position.

A forward hook on the family's text encoder (SD3: CLIP-L; Flux: T5) keeps, per encoder call, the
token ids and the hidden state the pipeline places in the text stream (SD3:
``hidden_states[-(clip_skip + 2)]`` in the first 77 × 768 channels; Flux: the whole T5 output); a
pre-hook on SD3's T5 keeps its ids. A transformer row whose text equals one of those hidden states
exactly is that prompt's row — whatever the order of encoding, ``num_images_per_prompt``, CFG, SLG,
PAG or Flux's true-CFG batching. Rows made from ``prompt_embeds`` match nothing and get no layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..families import Family
from ..layout import TokenLayout


@dataclass
class Encoding:
    """One text-encoder call: ids ``[n, L]``, the hidden state the pipeline uses ``[n, L, C]``, a second encoder's ids."""

    ids: torch.Tensor
    hidden: torch.Tensor
    second_ids: torch.Tensor | None = None


class PromptCapture:
    """Records prompt encodings while active; :meth:`match` labels transformer rows with them."""

    def __init__(self, pipe: Any, family: Family):
        self.pipe, self.family = pipe, family
        self.encodings: list[Encoding] = []
        self.new_since_last_match = False
        self._hooks: list[Any] = []
        self._layout_cache: dict[tuple, TokenLayout] = {}
        self._match_cache: tuple[tuple, tuple] | None = None

    def start(self) -> "PromptCapture":
        first = getattr(self.pipe, self.family.text_encoder, None)
        second = getattr(self.pipe, self.family.second_encoder, None) if self.family.second_encoder else None
        if isinstance(first, torch.nn.Module):
            self._hooks.append(first.register_forward_hook(self._first_hook, with_kwargs=True))
        if isinstance(second, torch.nn.Module):
            self._hooks.append(second.register_forward_pre_hook(self._second_hook, with_kwargs=True))
        return self

    def stop(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _first_hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not torch.is_tensor(ids):
            return None
        try:
            hidden = self.family.encoder_hidden(self.pipe, output)
        except (AttributeError, TypeError, IndexError):  # called without the outputs the pipeline uses
            return None
        self.encodings.append(Encoding(ids.detach().cpu(), hidden.detach()))
        self.encodings = self.encodings[-8:]  # a run encodes at most prompt + negative; keep a few
        self.new_since_last_match = True
        return None

    def _second_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_tensor(ids) and self.encodings and self.encodings[-1].second_ids is None:
            self.encodings[-1].second_ids = ids.detach().cpu()  # SD3 encodes CLIP-L, CLIP-G, then T5
        return None

    def match(self, ehs: torch.Tensor, image_grid: tuple[int, int]) -> tuple[tuple[int | None, ...], tuple[TokenLayout | None, ...]]:
        """Per row of ``encoder_hidden_states [B, n_text, C]``: (prompt index, layout), None where unmatched."""
        self.new_since_last_match = False
        key = (ehs.data_ptr(), tuple(ehs.shape), ehs._version, tuple(image_grid), len(self.encodings))
        if self._match_cache is not None and self._match_cache[0] == key:
            return self._match_cache[1]
        n_text = ehs.shape[1]
        found = [self._find(row) for row in ehs]  # (encoding, candidate prompt indices) or None
        prompts: list[int | None] = [None] * len(found)
        layouts: list[TokenLayout | None] = [None] * len(found)
        for enc in {id(f[0]): f[0] for f in found if f is not None}.values():
            rows = [r for r, f in enumerate(found) if f is not None and f[0] is enc]
            n = enc.hidden.shape[0]
            per = len(rows) // n if len(rows) % n == 0 else 0  # rows per prompt (num_images_per_prompt)
            for i, r in enumerate(rows):
                candidates = found[r][1]
                p = i // per if per and (i // per) in candidates else candidates[0]  # equal prompts: by order
                prompts[r], layouts[r] = p, self._layout(enc, p, image_grid, n_text)
        out = (tuple(prompts), tuple(layouts))
        self._match_cache = (key, out)
        return out

    def _find(self, row: torch.Tensor) -> tuple[Encoding, list[int]] | None:
        for enc in reversed(self.encodings):  # the newest run's encodings first
            part = self.family.row_text(row, enc.hidden[0])
            if part is None:
                continue
            part = part.to(device=enc.hidden.device, dtype=torch.float32)
            hits = [p for p in range(enc.hidden.shape[0]) if torch.equal(part, enc.hidden[p].to(torch.float32))]
            if hits:
                return enc, hits
        return None

    def _layout(self, enc: Encoding, p: int, image_grid, n_text: int) -> TokenLayout:
        ids = tuple(enc.ids[p].tolist())
        second = None if enc.second_ids is None else tuple(enc.second_ids[p].tolist())
        key = (ids, second, tuple(image_grid), n_text)
        if key not in self._layout_cache:
            prompt = self.family.prompt_text(self.pipe, list(ids), None if second is None else list(second))
            self._layout_cache[key] = self.family.layout(
                self.pipe, list(ids), None if second is None else list(second), image_grid, n_text, prompt)
        return self._layout_cache[key]

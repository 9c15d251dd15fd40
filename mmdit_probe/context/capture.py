"""Which prompt each transformer batch row carries, matched by value, never by position.

Forward hooks on the pipeline's CLIP-L encoder keep, per encoder call, the token ids and the hidden
state the pipeline takes (``hidden_states[-(clip_skip + 2)]``); a pre-hook on T5 keeps its ids. A
transformer row whose first 77 × 768 text channels equal one of those hidden states exactly is
that prompt's row — whatever the order of encoding, ``num_images_per_prompt``, CFG, SLG or PAG
batching. Rows made from ``prompt_embeds`` match nothing and get no layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..layout import CLIP_LENGTH, TokenLayout, joint_order


@dataclass
class Encoding:
    """One CLIP-L encoder call: ids ``[n, 77]``, the hidden state the pipeline uses ``[n, 77, C]``, T5 ids."""

    clip_ids: torch.Tensor
    hidden: torch.Tensor
    t5_ids: torch.Tensor | None = None


class PromptCapture:
    """Records prompt encodings while active; :meth:`match` labels transformer rows with them."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.encodings: list[Encoding] = []
        self.new_since_last_match = False
        self._hooks: list[Any] = []
        self._layout_cache: dict[tuple, TokenLayout] = {}
        self._match_cache: tuple[tuple, tuple] | None = None

    def start(self) -> "PromptCapture":
        clip = getattr(self.pipe, "text_encoder", None)
        t5 = getattr(self.pipe, "text_encoder_3", None)
        if isinstance(clip, torch.nn.Module):
            self._hooks.append(clip.register_forward_hook(self._clip_hook, with_kwargs=True))
        if isinstance(t5, torch.nn.Module):
            self._hooks.append(t5.register_forward_pre_hook(self._t5_hook, with_kwargs=True))
        return self

    def stop(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _clip_hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        hidden_states = getattr(output, "hidden_states", None)
        if not torch.is_tensor(ids) or hidden_states is None:
            return None
        try:
            skip = self.pipe.clip_skip
        except AttributeError:  # encode_prompt called outside __call__
            skip = None
        hidden = hidden_states[-2] if skip is None else hidden_states[-(skip + 2)]
        self.encodings.append(Encoding(ids.detach().cpu(), hidden.detach()))
        self.encodings = self.encodings[-8:]  # a run encodes at most prompt + negative; keep a few
        self.new_since_last_match = True
        return None

    def _t5_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_tensor(ids) and self.encodings and self.encodings[-1].t5_ids is None:
            self.encodings[-1].t5_ids = ids.detach().cpu()  # the pipeline encodes CLIP-L, CLIP-G, then T5
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
            width = enc.hidden.shape[-1]
            if row.shape[0] < CLIP_LENGTH or row.shape[1] < width:
                continue
            part = row[:CLIP_LENGTH, :width].to(device=enc.hidden.device, dtype=torch.float32)
            hits = [p for p in range(enc.hidden.shape[0]) if torch.equal(part, enc.hidden[p].to(torch.float32))]
            if hits:
                return enc, hits
        return None

    def _layout(self, enc: Encoding, p: int, image_grid, n_text: int) -> TokenLayout:
        clip_ids = tuple(enc.clip_ids[p].tolist())
        t5_ids = None if enc.t5_ids is None else tuple(enc.t5_ids[p].tolist())
        key = (clip_ids, t5_ids, tuple(image_grid), n_text)
        if key not in self._layout_cache:
            tok3 = getattr(self.pipe, "tokenizer_3", None)
            prompt = self.pipe.tokenizer.decode(list(clip_ids), skip_special_tokens=True)
            self._layout_cache[key] = TokenLayout.from_ids(
                image_grid, list(clip_ids), self.pipe.tokenizer, None if t5_ids is None else list(t5_ids), tok3,
                t5_length=n_text - CLIP_LENGTH, order=joint_order(self.pipe.transformer), prompt=prompt.strip(),
            )
        return self._layout_cache[key]

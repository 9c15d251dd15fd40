"""Capture the token ids a pipeline call feeds its text encoders, and turn them into per-row layouts."""

from __future__ import annotations

from typing import Any

import torch

from .layout import CLIP_LENGTH, TokenLayout, joint_order


class PromptCapture:
    """Forward pre-hooks on ``text_encoder`` (CLIP-L) and ``text_encoder_3`` (T5) record input ids.

    The SD3 pipeline encodes the prompt first, then (with CFG) the negative prompt; each
    encoder call sees ``[n_prompts, length]`` ids. :meth:`row_layouts` maps them to the
    transformer batch: ``[uncond rows ; cond rows]`` with CFG, each prompt repeated
    ``num_images_per_prompt`` times.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.clip: list[torch.Tensor] = []
        self.t5: list[torch.Tensor] = []
        self._hooks: list[Any] = []
        self._cache: dict[tuple, list[TokenLayout]] = {}

    def __enter__(self) -> "PromptCapture":
        for name, store in (("text_encoder", self.clip), ("text_encoder_3", self.t5)):
            enc = getattr(self.pipe, name, None)
            if isinstance(enc, torch.nn.Module):
                self._hooks.append(enc.register_forward_pre_hook(self._make_hook(store), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def _make_hook(store: list):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if torch.is_tensor(ids):
                store.append(ids.detach().cpu())
        return hook

    def cfg(self) -> bool:
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def row_layouts(self, batch: int, image_grid: tuple[int, int], n_text: int) -> list[TokenLayout] | None:
        """One layout per transformer batch row, or None when no prompt ids were seen."""
        if not self.clip:
            return None
        key = (batch, tuple(image_grid), n_text, len(self.clip), len(self.t5))
        if key in self._cache:
            return self._cache[key]
        cfg = self.cfg() and len(self.clip) >= 2
        # encode order: prompt, then negative prompt; batch order: [uncond ; cond]
        prompt = (self.clip[-2], self.t5[-2] if len(self.t5) >= 2 else None) if cfg else (self.clip[-1], self.t5[-1] if self.t5 else None)
        sets = [(self.clip[-1], self.t5[-1] if self.t5 else None), prompt] if cfg else [prompt]
        half = batch // len(sets)
        rows: list[TokenLayout] = []
        for clip_ids, t5_ids in sets:
            n_prompts = clip_ids.shape[0]
            per = max(half // max(n_prompts, 1), 1)
            for p in range(n_prompts):
                layout = self._layout(clip_ids[p], t5_ids[p] if t5_ids is not None else None, image_grid, n_text)
                rows.extend([layout] * per)
        rows = rows[:batch] if len(rows) >= batch else None
        self._cache[key] = rows
        return rows

    def branches(self, batch: int) -> list[str]:
        if self.cfg() and len(self.clip) >= 2:
            return ["uncond"] * (batch // 2) + ["cond"] * (batch - batch // 2)
        return ["cond"] * batch

    def _layout(self, clip_ids, t5_ids, image_grid, n_text) -> TokenLayout:
        tok3 = getattr(self.pipe, "tokenizer_3", None)
        prompt = self.pipe.tokenizer.decode(clip_ids.tolist(), skip_special_tokens=True)
        return TokenLayout.from_ids(
            image_grid, clip_ids.tolist(), self.pipe.tokenizer,
            t5_ids.tolist() if t5_ids is not None else None, tok3,
            t5_length=n_text - CLIP_LENGTH, order=joint_order(self.pipe.transformer), prompt=prompt.strip(),
        )

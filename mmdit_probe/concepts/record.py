"""What a :class:`~.probe.ConceptProbe` accumulates per call, and its assembly into :class:`ConceptMaps`.

Step slots: one per distinct ``(run, step)``; row slots: one per distinct ``(branch, index)`` — the
recorder's conventions, so both results line up.
"""

from __future__ import annotations

import torch

from ..context import CallContext
from .result import ConceptMaps


class ConceptRecording:
    def __init__(self) -> None:
        self.step_keys: dict[tuple[int, int], int] = {}
        self.steps: list[int] = []
        self.runs: list[int] = []
        self.timesteps: list[torch.Tensor] = []
        self.row_keys: dict[tuple[str, int], int] = {}
        self.grid: tuple[int, int] | None = None
        self.step_slot = -1
        self.row_slots: list[int] = []
        self.entries: list[tuple[int, int, list[int], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.bytes = 0

    def start_call(self, ctx: CallContext) -> None:
        key = (ctx.run, ctx.step)
        if key not in self.step_keys:
            self.step_keys[key] = len(self.step_keys)
            self.steps.append(ctx.step)
            self.runs.append(ctx.run)
            self.timesteps.append(ctx.timestep)
        self.step_slot = self.step_keys[key]
        self.row_slots = [self.row_keys.setdefault(rk, len(self.row_keys)) for rk in ctx.row_keys()]
        self.grid = self.grid or tuple(ctx.latent_hw)

    def add(self, layer: int, raw: torch.Tensor, mass: torch.Tensor, scores: torch.Tensor) -> None:
        """One block's maps of the current call: ``raw [B, C, (H,) N]``, ``mass [B, C, (H)]``, ``scores [B, C, N]``."""
        self.entries.append((self.step_slot, layer, self.row_slots, raw, mass, scores))
        self.bytes += sum(t.numel() * t.element_size() for t in (raw, mass, scores))

    def assemble(self, concepts: tuple[str, ...], layers: tuple[int, ...], kinds: tuple[str, ...],
                 heads: tuple[int, ...] | None, tokens: tuple[tuple[str, ...], ...]) -> ConceptMaps:
        gy, gx = self.grid or (0, 0)
        n_s, n_l, n_r, n_c = len(self.step_keys), len(layers), len(self.row_keys), len(concepts)
        hd = () if heads is None else (len(heads),)
        raw = torch.full((n_s, n_l, n_r, n_c, *hd, gy, gx), float("nan"))
        mass = torch.full((n_s, n_l, n_r, n_c, *hd), float("nan"))
        scores = torch.full((n_s, n_l, n_r, n_c, gy, gx), float("nan"))
        pos = {l: i for i, l in enumerate(layers)}
        for slot, layer, rows, r, m, s in self.entries:
            idx = (slot, pos[layer], torch.tensor(rows))
            raw[idx] = r.float().cpu().reshape(len(rows), n_c, *hd, gy, gx)
            mass[idx] = m.float().cpu()
            scores[idx] = s.float().cpu().reshape(len(rows), n_c, gy, gx)
        branches = [""] * n_r
        for (b, _), i in self.row_keys.items():
            branches[i] = b
        return ConceptMaps(concepts, raw, mass, scores, tuple(self.steps), tuple(float(t) for t in self.timesteps),
                           tuple(self.runs), layers, tuple(kinds[l] for l in layers), tuple(branches), heads, tokens)

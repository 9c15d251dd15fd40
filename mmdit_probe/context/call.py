"""``CallContext``: what one transformer call is — run, denoising step, kind, and per batch row its
branch, prompt and token layout. Built once per call by :class:`~mmdit_probe.context.ContextBuilder`
from the pipeline's own state, read by the recorder, interventions and activation caches alike."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..layout import TokenLayout

#: Branch of a batch row: CFG's unconditional and conditional rows, skip-layer guidance's extra
#: cond-only call, and perturbed-attention guidance's perturbed row.
BRANCHES = ("uncond", "cond", "slg", "perturbed")
#: Kind of transformer call within a denoising step: the guidance batch, a separate uncond call (Flux true CFG), SLG's extra call.
CALL_KINDS = ("main", "uncond", "slg")


class CallContextError(ValueError):
    """A transformer call whose rows cannot be labelled (or a row layout asked for that does not exist)."""


@dataclass(frozen=True)
class CallContext:
    """One transformer call.

    ``index``: transformer calls since the probe was installed (0, 1, …); ``run``: pipeline calls
    seen since then; ``step``: denoising step within the run (``0 … n_steps − 1``; SLG's extra call
    shares its main call's step); ``kind``: ``"main"`` or ``"slg"``; per row ``branches``,
    ``prompts`` (index of the row's prompt in the pipeline call, None when the pipeline was given
    embeddings) and ``layouts`` (None per row where no token ids exist).
    """

    index: int
    run: int
    step: int
    kind: str
    timestep: torch.Tensor  # 0-d, first row, on the model's device (no sync in the loop)
    branches: tuple[str, ...]
    prompts: tuple[int | None, ...]
    layouts: tuple[TokenLayout | None, ...]
    n_steps: int | None
    latent_hw: tuple[int, int]
    n_text: int
    pipeline: bool

    @property
    def batch(self) -> int:
        return len(self.branches)

    def rows(self, branch: str | Sequence[str] | None) -> tuple[int, ...]:
        """Batch rows of ``branch`` (a name, several names, or None for all rows)."""
        if branch is None:
            return tuple(range(self.batch))
        names = (branch,) if isinstance(branch, str) else tuple(branch)
        return tuple(i for i, b in enumerate(self.branches) if b in names)

    def layout(self, row: int) -> TokenLayout:
        """The token layout of ``row``, or a :class:`CallContextError` saying why there is none."""
        lay = self.layouts[row]
        if lay is None:
            raise CallContextError(
                f"batch row {row} ({self.branches[row]}) of this call has no token layout: the pipeline was given "
                f"embeddings (prompt_embeds / negative_prompt_embeds) for it, not a prompt. Pass the prompt text, "
                f"or layout=TokenLayout.from_prompt(pipe, prompt, ...) (one per row) to the recorder / intervene"
            )
        return lay

    def row_keys(self) -> tuple[tuple[str, int], ...]:
        """``(branch, index within the branch)`` per row: a row's identity across calls and steps."""
        seen: dict[str, int] = {}
        out = []
        for b in self.branches:
            out.append((b, seen.get(b, 0)))
            seen[b] = seen.get(b, 0) + 1
        return tuple(out)

    def with_rows(self, *, branches: Sequence[str] | None = None,
                  layouts: Sequence[TokenLayout | None] | None = None) -> "CallContext":
        """A copy with the rows described by the caller (a bare transformer's batch)."""
        out = self
        if branches is not None:
            if len(branches) != self.batch:
                raise CallContextError(f"branches names {len(branches)} rows but the transformer batch is {self.batch}")
            bad = [b for b in branches if b not in BRANCHES]
            if bad:
                raise CallContextError(f"unknown branch names {bad}; use {BRANCHES}")
            out = replace(out, branches=tuple(branches))
        if layouts is not None:
            if len(layouts) != self.batch:
                raise CallContextError(f"layout has {len(layouts)} rows but the transformer batch is {self.batch}")
            out = replace(out, layouts=tuple(layouts))
        return out

"""Contradictions between ablation specs: two specs writing the same place, or one making another moot.

Each spec lists the places it writes as :class:`Touch` es (layer, what, steps, branch, heads);
:func:`check_conflicts` refuses pairs that overlap in layer, steps and branch and clash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .rows import AblationError


@dataclass(frozen=True)
class Touch:
    """One place a spec writes to (for conflict checks): ``what`` at ``layer`` during ``steps``/``branch``."""

    layer: int | None
    what: str
    steps: tuple[int, ...] | None
    branch: str | None
    heads: tuple[int, ...] | None = None


_WRITES = ("attn_out", "attn2_out", "image_out", "text_out", "pooled")


def _overlap(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> bool:
    return a is None or b is None or bool(set(a) & set(b))


def _clash(a: Touch, b: Touch) -> str | None:
    """Why two touches contradict each other, or None."""
    if a.layer != b.layer or not _overlap(a.steps, b.steps) or not (a.branch is None or b.branch is None or a.branch == b.branch):
        return None
    kinds = {a.what, b.what}
    if "block" in kinds:
        return "a skipped block cannot be ablated or patched at the same time"
    if a.what == b.what and a.what in _WRITES:
        return f"both write the same {a.what.replace('_', ' ')}"
    inner = {w for w in kinds if w.startswith(("knock:", "heads:attn"))}
    if "attn_out" in kinds and any(w in ("heads:attn",) or w.startswith("knock:") for w in inner):
        return "the attention output is replaced, so an edit inside that attention has no effect"
    if "attn2_out" in kinds and "heads:attn2" in kinds:
        return "the attn2 output is replaced, so a head edit inside it has no effect"
    if a.what == b.what and (a.what.startswith("knock:") or a.what.startswith("heads:")) and _overlap(a.heads, b.heads):
        return "both change the same heads' attention (two knock-outs would leave the queries no keys)" \
            if a.what.startswith("knock:") else "both replace the same heads"
    return None


def check_conflicts(specs: Iterable[Any], transformer: Any) -> None:
    """Raise :class:`AblationError` when two specs contradict each other."""
    specs = list(specs)
    touched = [(i, t) for i, s in enumerate(specs) for t in s.touches(transformer)]
    for x in range(len(touched)):
        i, a = touched[x]
        for j, b in touched[x + 1:]:
            if i == j:
                continue
            why = _clash(a, b)
            if why:
                where = "the model" if a.layer is None else f"block {a.layer}"
                raise AblationError(
                    f"specs contradict each other at {where}: {specs[i].describe()!r} and {specs[j].describe()!r} — {why}. "
                    f"Drop one, or give them disjoint layers/steps/branches"
                )

"""The three token groups of a joint sequence with a context image: ``text``, ``image`` (generated), ``context``.

The probe processors report the whole image stream as ``call.n_image``; the generated part is the call's
grid (``call.context.latent_hw``, from ``img_ids`` rows with ``t = 0`` on Flux), a Flux Kontext context image
the rest (:mod:`mmdit_probe.families.kontext`). Without a context image ``context`` is empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..context import CallContextError
from ..layout import stream_slices

if TYPE_CHECKING:  # pragma: no cover
    from ..hooks import AttentionCall

__all__ = ["STREAM_GROUPS", "context_tokens", "stream_split"]

#: The token groups, in this order as query and as key of :class:`~.context_group.ContextMass` (3 × 3 quadrants).
STREAM_GROUPS = ("text", "image", "context")


def context_tokens(call: "AttentionCall") -> int:
    """Context-image tokens in this attention call: the image stream beyond the generated grid."""
    h, w = call.context.latent_hw
    n = call.n_image - h * w
    if n < 0:
        raise CallContextError(f"{call.site.name}: the image stream has {call.n_image} tokens, fewer than the "
                               f"generated grid {h}x{w}; this call's grid and sequence disagree")
    for lay in call.context.layouts:
        if lay is not None and lay.context_grid is not None and lay.n_context != n:
            raise CallContextError(f"the row layout has a {lay.context_grid[0]}x{lay.context_grid[1]} context image "
                                   f"but this call carries {n} context tokens; build it with "
                                   f"mmdit_probe.kontext.kontext_layout for the same image, size and max_area")
    return n


def stream_split(call: "AttentionCall") -> dict[str, slice]:
    """Joint-sequence slices of ``text``, ``image`` (generated tokens only) and ``context`` for ``call``."""
    n_context = context_tokens(call)
    return stream_slices(call.order, call.n_image - n_context, call.n_text, n_context)

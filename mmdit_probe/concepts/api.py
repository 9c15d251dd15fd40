"""``concept_maps``: run a pipeline call (or any call) under a :class:`ConceptProbe` and return its maps."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from .probe import ConceptProbe
from .result import ConceptMaps
from .tokens import ConceptError


def concept_maps(pipe: Any, concepts: Sequence[str], prompt: str | list[str] | None = None, *,
                 call: Callable[[], Any] | None = None, target: Any = None, max_sequence_length: int | None = None,
                 clip_skip: int | None = None, layers: int | Sequence[int] | None = None,
                 steps: int | Sequence[int] | None = None, heads: str = "mean", budget_bytes: int = 1 << 30,
                 branches: Sequence[str] | None = None, **pipe_kwargs: Any) -> ConceptMaps:
    """Concept maps of ``pipe(prompt, **pipe_kwargs)`` — or of ``call()`` (e.g. one transformer call; then
    ``target=pipe.transformer``) — with ``result.call_output`` / ``result.images`` set.

    ``max_sequence_length`` and ``clip_skip`` are passed to the pipeline call too, so concepts are encoded
    as the prompt is. Everything is checked before the call runs (see :class:`ConceptProbe`).
    """
    if (call is None) == (prompt is None):
        raise ConceptError("pass either prompt= (runs pipe(prompt, **pipe_kwargs)) or call= (a function to run "
                           "under the probe), not both or neither")
    if call is not None and pipe_kwargs:
        raise ConceptError(f"pipeline arguments {sorted(pipe_kwargs)} given with call=; put them inside call")
    probe = ConceptProbe(pipe, concepts, target=target, max_sequence_length=max_sequence_length, clip_skip=clip_skip,
                         layers=layers, steps=steps, heads=heads, budget_bytes=budget_bytes, branches=branches)
    if call is None:
        kwargs = dict(pipe_kwargs)
        if max_sequence_length is not None:
            kwargs["max_sequence_length"] = max_sequence_length
        if clip_skip is not None:
            kwargs["clip_skip"] = clip_skip
        call = lambda: pipe(prompt, **kwargs)  # noqa: E731
    with probe:
        output = call()
    return dataclasses.replace(probe.result, call_output=output)

"""``analyse_image``: record attention on a real image, one transformer call per noise level σ.

The calls run outside the pipeline's sampler, so their rows are described to the probe the way a bare
transformer's are (``AttentionRecorder(transformer, layout=..., branches=...)``): ``step`` is the σ
index (the probe counts the calls it sees), ``branch`` / ``layouts`` come from the analysis (``uncond``
rows carry the negative prompt), and the result's ``prompt`` coordinate is set to 0 for every row, as a
one-prompt pipeline call labels it. ``sigma`` joins ``timestep`` as a coordinate on ``step``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..ablate import intervene
from ..hooks import ProbeController
from ..maps import MapSelection
from ..record import AttentionRecorder
from ..result import AttentionResult
from .families import analysis_family
from .inputs import AnalysisInputs, inputs_from_plan, plan_analysis
from .latents import check_sigmas

_OWN = ("layout", "branches")


class ImageAnalysis(AttentionResult):
    """The :class:`~mmdit_probe.AttentionResult` of :func:`analyse_image` (``step`` = σ index, ``sigma``
    coordinate), plus ``concepts``: the :class:`~mmdit_probe.concepts.ConceptMaps` of the same calls when
    concepts were asked for (its step ``i`` is ``sigmas[i]`` too), else None. ``save`` writes the attention
    statistics; ``sel`` returns a plain result."""

    def __init__(self, result: AttentionResult, concepts: Any = None):
        super().__init__(result.stats, result.maps, result.map_meta, result.layouts, result.meta)
        self.concepts = concepts

    @property
    def sigmas(self) -> tuple[float, ...]:
        return tuple(self.mass.aux["sigma"][1])


def check_recorder_kwargs(recorder_kwargs: Mapping[str, Any], n_sigmas: int, specs: Sequence[Any] = ()) -> None:
    """Refuse, before anything runs, what the analysis sets itself or what points past the σ list."""
    own = [k for k in _OWN if k in recorder_kwargs]
    if own:
        raise TypeError(f"analyse_image describes the batch rows itself; leave out {', '.join(own)}")
    maps = recorder_kwargs.get("maps")
    sel = [] if maps is None else [maps] if isinstance(maps, MapSelection) else list(maps)
    for what, steps in [(str(m), m.steps) for m in sel if isinstance(m, MapSelection)] + [
            (type(s).__name__, getattr(s, "steps", None)) for s in specs]:
        late = [s for s in steps or () if s >= n_sigmas]
        if late:
            raise ValueError(f"{what}: steps {late} do not exist here: step i is the i-th of the {n_sigmas} sigmas "
                             f"(steps 0..{n_sigmas - 1})")


def _check_free(transformer: torch.nn.Module) -> None:
    ctl = transformer.__dict__.get(ProbeController._ATTR)
    if ctl is not None and ctl.pipe is not None:
        raise RuntimeError(
            "the transformer is being probed through its pipeline (an AttentionRecorder / intervene / "
            "record_activations entered on the pipeline); analyse_image runs the transformer outside the pipeline's "
            "sampler, so exit that first. Pass interventions as analyse_image(..., specs=[...]) and recorder "
            "options as keyword arguments")


def labelled(result: AttentionResult, inputs: AnalysisInputs) -> AttentionResult:
    """``result`` with ``sigma`` on ``step``, every row's ``prompt`` 0 and ``meta["analysis"]`` = the settings."""
    stats = {}
    for name, st in result.stats.items():
        aux = dict(st.aux)
        if "step" in st.dims:
            aux["sigma"] = ("step", tuple(inputs.sigmas[: st.shape["step"]]))
        if "batch" in st.dims:
            aux["prompt"] = ("batch", (0,) * st.shape["batch"])
        stats[name] = dataclasses.replace(st, aux=aux)
    meta = {**result.meta, "analysis": dict(inputs.settings)}
    return AttentionResult(stats, result.maps, result.map_meta, result.layouts, meta)


def _concept_probe(pipe: Any, concepts: Sequence[str] | None, options: Mapping[str, Any] | None,
                   branches: Sequence[str] | None, max_sequence_length: int):
    """A :class:`~mmdit_probe.concepts.ConceptProbe` on the bare transformer (its checks run here), or None."""
    if concepts is None:
        if options:
            raise TypeError("concept_options given without concepts=[...]")
        return None
    from ..concepts import ConceptProbe

    opts = dict(options or {})
    bad = [k for k in ("target", "branches", "max_sequence_length") if k in opts]
    if bad:
        raise TypeError(f"analyse_image sets the concept probe's {', '.join(bad)} itself; leave them out")
    return ConceptProbe(pipe, concepts, target=pipe.transformer, branches=branches,
                        max_sequence_length=max_sequence_length, **opts)


def run_analysis(pipe: Any, inputs: AnalysisInputs, *, specs: Iterable[Any] = (),
                 concepts: Sequence[str] | None = None, concept_options: Mapping[str, Any] | None = None,
                 **recorder_kwargs: Any) -> ImageAnalysis:
    """Run ``inputs``' calls on ``pipe.transformer`` under an :class:`~mmdit_probe.AttentionRecorder`
    (``recorder_kwargs``), a :class:`~mmdit_probe.concepts.ConceptProbe` for ``concepts`` (``concept_options``:
    its ``layers``, ``heads``, ``clip_skip``, ...) and :func:`~mmdit_probe.intervene` with ``specs`` (the probes
    see the edited attention). Processors and hooks are restored on exit, also after an exception."""
    specs = list(specs)
    check_recorder_kwargs(recorder_kwargs, len(inputs.sigmas), specs)
    tr = pipe.transformer
    _check_free(tr)
    probe = _concept_probe(pipe, concepts, concept_options, inputs.branches, inputs.settings["max_sequence_length"])
    rows = {"layout": list(inputs.layouts), "branches": inputs.branches}
    with contextlib.ExitStack() as stack:
        if specs:
            stack.enter_context(intervene(tr, *specs, **rows))
        rec = stack.enter_context(AttentionRecorder(tr, **rows, **recorder_kwargs))
        if probe is not None:
            stack.enter_context(probe)
        with torch.no_grad():
            for kwargs in inputs.calls:
                tr(**kwargs)
    cm = None
    if probe is not None:  # its step slots are the σ indices, like the attention result's
        cm = dataclasses.replace(probe.result, steps=tuple(range(len(probe.result.steps))))
    return ImageAnalysis(labelled(rec.result, inputs), cm)


def analyse_image(pipe: Any, image: Any, prompt: str, sigmas: Sequence[float] | float = (0.3, 0.6), *, seed: int = 0,
                  guidance_scale: float | None = None, negative_prompt: str | None = None,
                  max_sequence_length: int | None = None, height: int | None = None, width: int | None = None,
                  concepts: Sequence[str] | None = None, concept_options: Mapping[str, Any] | None = None,
                  specs: Iterable[Any] = (), **recorder_kwargs: Any) -> ImageAnalysis:
    """Attention statistics of ``pipe``'s transformer on a real ``image`` noised to each σ in ``sigmas``.

    The image (PIL, ``[3, H, W]`` tensor or ``[H, W, 3]`` array in 0…1) is encoded with the pipeline's VAE
    (posterior mode, normalised as the pipeline decodes), noised as ``x_σ = (1 − σ)·x0 + σ·ε`` (one ``ε`` from
    ``seed`` for every σ) and given to the transformer once per σ, with the CFG rows the pipeline would use.
    ``recorder_kwargs`` go to :class:`~mmdit_probe.AttentionRecorder` (``words=True``, ``groups=True``,
    ``maps=...``; map steps are σ indices), ``concepts`` (words the prompt need not contain) to a
    :class:`~mmdit_probe.concepts.ConceptProbe` on the same calls, ``specs`` to :func:`~mmdit_probe.intervene`.

    Returns an :class:`ImageAnalysis` (an :class:`~mmdit_probe.AttentionResult`): ``step`` = σ index, with
    ``sigma`` and ``timestep`` coordinates on it (``res.to_dataframe()`` has a ``sigma`` column), and
    ``res.concepts`` (``ConceptMaps`` or None). Every argument is checked before anything computes.
    """
    specs = list(specs)
    analysis_family(pipe)  # an unsupported model is refused first
    check_recorder_kwargs(recorder_kwargs, len(check_sigmas(sigmas)), specs)
    _check_free(pipe.transformer)
    AttentionRecorder(pipe.transformer, **recorder_kwargs)  # its own checks (layers, maps, ...) before any compute
    plan = plan_analysis(pipe, image, prompt, sigmas, seed=seed, guidance_scale=guidance_scale,
                         negative_prompt=negative_prompt, max_sequence_length=max_sequence_length, height=height,
                         width=width)
    _concept_probe(pipe, concepts, concept_options, plan.branches, plan.settings["max_sequence_length"])  # its checks
    return run_analysis(pipe, inputs_from_plan(pipe, image, plan), specs=specs, concepts=concepts,
                        concept_options=concept_options, **recorder_kwargs)

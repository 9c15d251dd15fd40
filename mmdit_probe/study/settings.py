"""Settings of a study: what each (prompt, seed) is run under — ablation specs, call options, another pipeline.

``study(..., specs=[...])`` runs ``baseline`` plus one setting per spec; ``settings=`` names them
yourself::

    settings={"t5": {}, "no T5": Setting(pipe=without_t5(pipe)), "cfg 1": {"guidance_scale": 1.0},
              "slg": {"skip_guidance_layers": [2]}, "skip 3": [mp.SkipLayers([3])]}

Every setting runs every (prompt, seed), so two settings are compared paired by prompt and seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["Setting", "resolve_settings", "without_t5", "describe_entry"]

RESERVED = ("prompt", "generator", "output_type", "return_dict", "callback_on_step_end")


@dataclass(frozen=True)
class Setting:
    """One setting: ``specs`` applied with ``mp.intervene``, ``call_kwargs`` overriding the study's pipeline
    arguments, and ``pipe`` replacing the study's pipeline (e.g. :func:`without_t5`, another family)."""

    name: str = ""
    specs: tuple = ()
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    pipe: Any = None

    def fingerprint(self) -> dict:
        """What a shard stores to recognise this setting on resume (not the weights)."""
        pipe = self.pipe
        return {"name": self.name, "specs": [s.describe() for s in self.specs],
                "call_kwargs": {k: repr(v) for k, v in sorted(self.call_kwargs.items())},
                "pipe": None if pipe is None else {"class": type(pipe).__name__,
                                                   "t5": getattr(pipe, "text_encoder_3", None) is not None}}


def describe_entry(entry: Any) -> str:
    """One line for a spec or a list of specs (joined with ``" + "``)."""
    from ..ablate import Spec

    return entry.describe() if isinstance(entry, Spec) else " + ".join(s.describe() for s in entry)


def _as_specs(entry: Any) -> tuple:
    from ..ablate import Spec

    return (entry,) if isinstance(entry, Spec) else tuple(entry)


def _as_setting(name: str, value: Any) -> Setting:
    from ..ablate import Spec

    if isinstance(value, Setting):
        return Setting(name, tuple(value.specs), dict(value.call_kwargs), value.pipe)
    if value is None:
        return Setting(name)
    if isinstance(value, Mapping):
        return Setting(name, (), dict(value))
    if isinstance(value, Spec) or (isinstance(value, Sequence) and all(isinstance(s, Spec) for s in value)):
        return Setting(name, _as_specs(value))
    raise TypeError(f"setting {name!r}: give a Setting, a dict of pipeline arguments or a list of specs; "
                    f"got {type(value).__name__}")


def resolve_settings(pipe: Any, specs: Sequence | None, settings: Mapping | Sequence | None) -> list[Setting]:
    """The study's settings in order (the first is the reference of differences); checks every spec."""
    from ..ablate import check_specs

    if specs is not None and settings is not None:
        raise ValueError("pass specs= (baseline plus one setting per spec) or settings= (named settings, which "
                         "may carry specs: Setting('name', specs=[...])), not both")
    if specs is not None:
        entries = list(specs)
        if not entries:
            raise ValueError("specs= is empty; leave it out to record the baseline only")
        out = [Setting("baseline")]
        for e in entries:
            out.append(Setting(describe_entry(e), _as_specs(e)))
    elif settings is None:
        out = [Setting("baseline")]
    elif isinstance(settings, Mapping):
        out = [_as_setting(str(k), v) for k, v in settings.items()]
    else:
        out = []
        for s in settings:
            if not isinstance(s, Setting) or not s.name:
                raise TypeError("a list of settings must hold named Setting objects; or pass a dict name -> setting")
            out.append(_as_setting(s.name, s))
    if not out:
        raise ValueError("settings= is empty")
    seen: dict[str, int] = {}
    for i, s in enumerate(out):  # unique names: the same spec twice gets "#2"
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            out[i] = Setting(f"{s.name} #{seen[s.name]}", s.specs, s.call_kwargs, s.pipe)
    for s in out:
        bad = [k for k in s.call_kwargs if k in RESERVED]
        if bad:
            raise ValueError(f"setting {s.name!r}: {bad} are set by the study (prompts and seeds pick them)")
        if s.specs:
            check_specs(s.pipe if s.pipe is not None else pipe, *s.specs)
    return out


def settings_fingerprint(settings: Sequence[Setting]) -> str:
    return hashlib.sha256(json.dumps([s.fingerprint() for s in settings], sort_keys=True).encode()).hexdigest()


def without_t5(pipe: Any) -> Any:
    """The same pipeline (shared modules, no copies) without its T5 encoder: SD3 then feeds zeros for T5."""
    comps = dict(pipe.components)
    if "text_encoder_3" not in comps:
        raise ValueError(f"{type(pipe).__name__} has no text_encoder_3 (T5) to leave out")
    comps["text_encoder_3"] = None
    comps["tokenizer_3"] = None
    out = type(pipe)(**comps)
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    for attr in ("shipped_run_kwargs", "shapes_config"):
        if hasattr(pipe, attr):
            setattr(out, attr, getattr(pipe, attr))
    return out

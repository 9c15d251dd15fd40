"""The settings file of a saved sweep: what it was made with, so that a resume never mixes experiments.

``sweep(..., save_to="skip.csv")`` writes ``skip.settings.json`` next to the table (atomically, before the
first run) and refuses to resume it with other settings. Format (JSON object, ``version`` 1)::

    {"format": "mmdit_probe.sweep", "version": 1, "table": "skip.csv",
     "mmdit_probe": "0.1.0",                   # package version that made it
     "model": "StableDiffusion3Pipeline:3f…",  # fingerprint: classes, configs, shapes, dtypes, first weights
     "prompts": [...], "seeds": [...],          # may grow on resume (never shrink or change)
     "specs": ["skip block 0", ...],            # one line per entry, in spec_index order
     "metrics": [{"name": "image_mse", "on": "image", "fn": "mmdit_probe.effect.mse"}, ...],
     "call": {"num_inference_steps": 28, ...},  # the pipeline keyword arguments
     "extra": {"model": "tiny", "kind": "skip-layers"},  # caller's own settings (the CLI's options)
     "transformer_calls": 28}                   # velocity rows per per-step metric (null until the first run)

Every key but ``table`` and ``transformer_calls`` must match to resume, except that ``prompts`` and
``seeds`` may be extended: the table is keyed by (prompt, seed, spec_index, metric, step) and each
(prompt, seed) has its own baseline, so runs of the old prompts and seeds stay valid.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

FORMAT, VERSION = "mmdit_probe.sweep", 1
EXTENDABLE = ("prompts", "seeds")
NOT_COMPARED = ("format", "version", "table", "transformer_calls")


class SweepFileError(ValueError):
    """A sweep table or settings file that cannot be used; the message names the file."""


class SweepSettingsError(SweepFileError):
    """Resume refused: ``differences`` lists ``(setting, recorded, given)``."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


def settings_path(table: str | Path) -> Path:
    """``skip.csv`` → ``skip.settings.json`` (same folder)."""
    table = Path(table)
    return table.with_name(f"{table.stem}.settings.json")


def describe_callable(fn: Any) -> str:
    """``module.qualname`` of a function (with a partial's arguments); no memory addresses."""
    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in sorted(fn.keywords.items())]
        return f"{describe_callable(fn.func)}({', '.join(args)})"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def jsonable(value: Any) -> Any:
    """``value`` as JSON: plain values kept, tensors by shape, dtype and sha256, callables by name, else repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return {"tensor": list(t.shape), "dtype": str(t.dtype), "sha256": digest}
    if callable(value):
        return {"callable": describe_callable(value)}
    return {"repr": repr(value)}


def _config(obj: Any) -> dict:
    cfg = getattr(obj, "config", None)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg) if isinstance(cfg, Mapping) else {}
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}


def _head_bytes(t: torch.Tensor) -> bytes:
    """The first 64 values of ``t`` as bytes (empty for weights that are not materialised, e.g. on meta)."""
    try:
        head = t.detach().reshape(-1)[:64].cpu().contiguous()
        return head.view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError, NotImplementedError):  # meta / quantized / dtypes numpy cannot view
        return b""


def model_fingerprint(pipe: Any) -> str:
    """``"<PipelineClass>:<16 hex>"``: sha256 of every component's class and config and of every weight's
    name, shape, dtype and first 64 values (cheap on any model; a file path or device does not count)."""
    from .hooks import resolve_transformer

    comps = getattr(pipe, "components", None)
    comps = dict(comps) if isinstance(comps, Mapping) else {"transformer": resolve_transformer(pipe)}
    h = hashlib.sha256(type(pipe).__name__.encode())
    for name in sorted(comps):
        comp = comps[name]
        if comp is None:
            continue
        h.update(f"\0{name}\0{type(comp).__name__}\0".encode())
        h.update(json.dumps(_config(comp), sort_keys=True, default=str).encode())
        if isinstance(comp, torch.nn.Module):
            for key, t in comp.state_dict().items():
                h.update(f"\0{key}{tuple(t.shape)}{t.dtype}".encode())
                h.update(_head_bytes(t))
    return f"{type(pipe).__name__}:{h.hexdigest()[:16]}"


def metric_settings(metrics: Sequence[Any]) -> list[dict]:
    """How the settings file records :class:`~mmdit_probe.effect.Metric` s: name, target, function."""
    return [{"name": m.name, "on": m.on, "fn": describe_callable(m.fn)} for m in metrics]


def build_settings(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], specs: Sequence[str],
                   metrics: Sequence[Any], call_kwargs: Mapping[str, Any], extra: Mapping[str, Any] | None,
                   table: str) -> dict:
    """The settings object of a sweep (see the module docstring)."""
    from . import __version__

    return {"format": FORMAT, "version": VERSION, "table": table, "mmdit_probe": __version__,
            "model": model_fingerprint(pipe), "prompts": list(prompts), "seeds": [int(s) for s in seeds],
            "specs": list(specs),
            "metrics": metric_settings(metrics),
            "call": jsonable(dict(call_kwargs)), "extra": jsonable(dict(extra or {})), "transformer_calls": None}


def write_settings(path: Path, settings: dict) -> None:
    """Write the settings JSON atomically."""
    from .io import atomic_write

    atomic_write(path, (json.dumps(settings, indent=1, allow_nan=True) + "\n").encode())


_TYPES = {"mmdit_probe": str, "model": str, "prompts": list, "seeds": list, "specs": list, "metrics": list,
          "call": dict, "extra": dict}


def read_settings(path: Path) -> dict:
    """Read and check a settings file; any problem raises :class:`SweepFileError` naming it."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SweepFileError(f"{path} is not a sweep settings file (not JSON: {err}); restore it from a copy, or "
                             f"start a new sweep in another folder") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise SweepFileError(f"{path} is not a sweep settings file (no \"format\": \"{FORMAT}\")")
    if settings.get("version") != VERSION:
        raise SweepFileError(f"{path}: sweep settings version {settings.get('version')!r} is not {VERSION}: written "
                             f"by another mmdit_probe release; resume it with that release, or start a new sweep")
    bad = [k for k, t in _TYPES.items() if not isinstance(settings.get(k), t)]
    calls = settings.get("transformer_calls")
    if calls is not None and (type(calls) is not int or calls < 1):
        bad.append("transformer_calls")
    if not all(type(s) is int for s in settings.get("seeds") or []):
        bad.append("seeds")
    if bad:
        raise SweepFileError(f"{path}: malformed sweep settings (fields {sorted(set(bad))} missing or of the wrong "
                             f"type); restore it from a copy, or start a new sweep in another folder")
    return settings


def _flat(settings: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key in NOT_COMPARED:
            continue
        if key in ("call", "extra") and isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def differences(recorded: Mapping[str, Any], given: Mapping[str, Any], partial: bool = False
                ) -> list[tuple[str, Any, Any]]:
    """``(setting, recorded, given)`` for each setting that forbids resuming (``call.*`` / ``extra.*`` per key).

    ``prompts`` / ``seeds`` differ only if ``given`` drops or changes one. With ``partial`` only the
    settings present in ``given`` are compared (the CLI checks its options before the model loads).
    """
    rec, new = _flat(recorded), _flat(given)
    keys = list(new) if partial else list(dict.fromkeys([*rec, *new]))
    out = []
    for key in keys:
        a, b = rec.get(key), new.get(key)
        if key in EXTENDABLE and isinstance(a, list) and isinstance(b, list):
            if not set(a) <= set(b):
                out.append((key, a, b))
        elif a != b:
            out.append((key, a, b))
    return out


def merged(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """``given`` with the recorded prompts and seeds first (in their order), then the added ones."""
    out = dict(given)
    for key in EXTENDABLE:
        out[key] = list(recorded[key]) + [v for v in given[key] if v not in recorded[key]]
    out["transformer_calls"] = recorded.get("transformer_calls")
    return out


def format_differences(diffs: Sequence[tuple[str, Any, Any]], names: Mapping[str, str] | None = None) -> str:
    """``"call.num_inference_steps: 4 recorded, 3 now; …"`` (setting names through ``names`` if given)."""
    names = names or {}

    def short(v: Any) -> str:
        text = json.dumps(v) if not isinstance(v, str) else repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    return "; ".join(f"{names.get(k, k)}: {short(a)} recorded, {short(b)} now" for k, a, b in diffs)

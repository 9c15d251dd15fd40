"""Save/load results without pickle: one safetensors file, coordinates and layouts as JSON in its header.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
target (atomic on POSIX): a crash never leaves a half-written results file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .layout import TextToken, TokenLayout
from .named import Stat

FORMAT = "mmdit_probe.result"
VERSION = 1


class ResultsFileError(ValueError):
    """A results file that cannot be read: corrupt, truncated, or not written by mmdit_probe."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the finished file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def layout_to_json(layout: TokenLayout) -> dict:
    cols = {f: [getattr(t, f) for t in layout.text] for f in TextToken.__dataclass_fields__}
    return {"image_grid": list(layout.image_grid), "order": list(layout.order), "prompt": layout.prompt,
            "has_t5": layout.has_t5, "text": cols}


def layout_from_json(d: dict) -> TokenLayout:
    cols = d["text"]
    n = len(cols["position"])
    text = tuple(TextToken(**{f: cols[f][i] for f in cols}) for i in range(n))
    return TokenLayout(tuple(d["image_grid"]), text, tuple(d["order"]), d.get("prompt"), d.get("has_t5", True))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x


def save_result(result, path) -> str:
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "stats": {}, "maps": [], "meta": result.meta}
    for name, st in result.stats.items():
        tensors[f"stat/{name}"] = st.values.detach().float().cpu().contiguous()
        header["stats"][name] = {
            "dims": list(st.dims),
            "coords": {d: _jsonable(c) for d, c in st.coords.items()},
            "aux": {k: [d, _jsonable(v)] for k, (d, v) in st.aux.items()},
        }
    for i, (key, t) in enumerate(result.maps.items()):
        tensors[f"map/{i}"] = t.detach().float().cpu().contiguous()
        header["maps"].append({"key": list(key), "tensor": f"map/{i}", **result.map_meta.get(key, {})})
    distinct: list[TokenLayout] = []
    rows = []
    for lay in result.layouts:
        if lay is None:
            rows.append(None)
            continue
        idx = next((i for i, d in enumerate(distinct) if d is lay or d == lay), None)
        if idx is None:
            distinct.append(lay)
            idx = len(distinct) - 1
        rows.append(idx)
    header["layouts"] = {"distinct": [layout_to_json(l) for l in distinct], "rows": rows}
    meta = {"mmdit_probe": json.dumps(header)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return str(path)


def read_result(path) -> tuple[dict, dict, dict, list, dict]:
    """``(stats, maps, map_meta, layouts, meta)`` of a results file; ``AttentionResult.load`` builds the result."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}; save one with result.save(path) or `mmdit-probe record`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        header = json.loads(meta["mmdit_probe"])
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise ResultsFileError(
            f"{path} is not a readable mmdit_probe results file (corrupt, truncated or another format: {err}). "
            f"Re-save the result with result.save(path) or record the run again."
        ) from err
    if header.get("format") != FORMAT:
        raise ResultsFileError(f"{path} is a safetensors file but not an mmdit_probe result (format {header.get('format')!r})")
    if int(header.get("version", 0)) > VERSION:
        raise ResultsFileError(f"{path} was written by a newer mmdit_probe (version {header['version']}); upgrade mmdit_probe")
    try:
        stats = {}
        for name, d in header["stats"].items():
            coords = {k: tuple(v) for k, v in d["coords"].items()}
            aux = {k: (v[0], tuple(v[1])) for k, v in d["aux"].items()}
            stats[name] = Stat(tensors[f"stat/{name}"], tuple(d["dims"]), coords, aux)
        maps, map_meta = {}, {}
        for m in header["maps"]:
            key = tuple(m["key"])
            maps[key] = tensors[m["tensor"]]
            map_meta[key] = {k: v for k, v in m.items() if k not in ("key", "tensor")}
        distinct = [layout_from_json(d) for d in header["layouts"]["distinct"]]
        layouts = [distinct[i] if i is not None else None for i in header["layouts"]["rows"]]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ResultsFileError(f"{path}: results header is inconsistent ({err!r}); record the run again") from err
    return stats, maps, map_meta, layouts, header.get("meta", {})

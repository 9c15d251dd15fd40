"""Save/load results without pickle: one safetensors file, coordinates and layouts as JSON in its header.

Tensors ``stat/<name>``, ``map/<i>`` (float32), ``recorded/<name>`` (uint8: which entries were recorded); header metadata ``"mmdit_probe"`` (JSON: format, version,
stats, maps, layouts, meta) and, from version 2, ``"mmdit_probe.sha256"`` (:func:`checksum`). Versions:
1 (no checksum) loads with a ``UserWarning``; upgrade it with ``AttentionResult.load(path).save(path)``.
2 (this release) is verified on every load. Newer versions are refused with a hint to upgrade mmdit_probe.

A load reads the file once, verifies the checksum, then every header field's type and tensor's shape:
anything wrong raises :class:`ResultsFileError`. No header field is a path: ``meta["run"]["image"]``
(the CLI opens it next to the results file) must be a bare file name.

Saves write ``.<name>.<8 hex>.tmp`` in the target's folder (umask mode, locked while written), fsync,
then rename it over the target (atomic on POSIX); the temporary file is removed on any exception, and one
left by a killed process is removed by the next save to that target.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as serialize

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so stale temporary files are not removed
    fcntl = None

from .layout import TextToken, TokenLayout
from .named import Stat

FORMAT = "mmdit_probe.result"
VERSION = 2
HEADER_KEY, CHECKSUM_KEY = "mmdit_probe", "mmdit_probe.sha256"
RECORD_AGAIN = "record the run again (or restore the file from a copy)"


class ResultsFileError(ValueError):
    """A results file that cannot be read: corrupt, truncated, tampered, or not written by mmdit_probe."""


class _Bad(Exception):
    """Internal: a header field failed validation."""


# ---- atomic writes ----------------------------------------------------------------------------
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of ``path`` left by killed saves (never one a live save holds locked)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")  # mkstemp's names too
    for name in filter(pattern.fullmatch, os.listdir(path.parent) if fcntl is not None else ()):
        try:
            fd = os.open(path.parent / name, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a running save holds it
            os.unlink(path.parent / name)
        except OSError:
            pass
        finally:
            os.close(fd)


def _open_temp(path: Path) -> tuple[Path, int]:
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system; then cleaners cannot lock (nor remove) it either
            pass
        if os.fstat(fd).st_nlink:  # else a concurrent cleaner removed it before we locked it
            return tmp, fd
        os.close(fd)


def atomic_write(path, write) -> None:
    """Write ``write`` (bytes, or a callable ``write(tmp_path)``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp, fd = _open_temp(path)
    try:
        if isinstance(write, (bytes, bytearray, memoryview)):
            _write_all(fd, write)
        else:
            write(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


# ---- header <-> objects -----------------------------------------------------------------------
def layout_to_json(layout: TokenLayout) -> dict:
    cols = {f: [getattr(t, f) for t in layout.text] for f in TextToken.__dataclass_fields__}
    return {"image_grid": list(layout.image_grid), "order": list(layout.order), "prompt": layout.prompt,
            "has_t5": layout.has_t5, "text": cols,
            "context_grid": None if layout.context_grid is None else list(layout.context_grid)}


def layout_from_json(d: dict) -> TokenLayout:
    cols = d["text"]
    n = len(cols["position"])
    text = tuple(TextToken(**{f: cols[f][i] for f in cols}) for i in range(n))
    grid = d.get("context_grid")
    return TokenLayout(tuple(d["image_grid"]), text, tuple(d["order"]), d.get("prompt"), d.get("has_t5", True),
                       None if grid is None else tuple(grid))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x


def checksum(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the header JSON text and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(f"{FORMAT}\0{len(header_json)}\0{header_json}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(json.dumps([name, str(t.dtype), list(tensors[name].shape)]).encode() + b"\0")
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def save_result(result, path) -> str:
    """Write ``result`` to ``path`` (format version :data:`VERSION`, with checksum)."""
    path = Path(path)
    _check(_is_bare_name_or_absent(result.meta), "meta.run.image must be a bare file name (no folder, no '..')",
           ValueError)
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "stats": {}, "maps": [], "meta": result.meta}
    for name, st in result.stats.items():
        tensors[f"stat/{name}"] = st.values.detach().float().cpu().contiguous()
        header["stats"][name] = {
            "dims": list(st.dims),
            "coords": {d: _jsonable(c) for d, c in st.coords.items()},
            "aux": {k: [d, _jsonable(v)] for k, (d, v) in st.aux.items()},
            "recorded": st.recorded is not None,
        }
        if st.recorded is not None:  # which entries were recorded (NaN elsewhere means "not recorded")
            tensors[f"recorded/{name}"] = st.recorded.to(torch.uint8).cpu().contiguous()
    for i, (key, t) in enumerate(result.maps.items()):
        tensors[f"map/{i}"] = t.detach().float().cpu().contiguous()
        header["maps"].append({"key": list(key), "tensor": f"map/{i}", **result.map_meta.get(key, {})})
    distinct: list[TokenLayout] = []
    for lay in result.layouts:
        if lay is not None and lay not in distinct:
            distinct.append(lay)
    rows = [None if lay is None else distinct.index(lay) for lay in result.layouts]
    header["layouts"] = {"distinct": [layout_to_json(l) for l in distinct], "rows": rows}
    text = json.dumps(header)
    atomic_write(path, serialize(tensors, metadata={HEADER_KEY: text, CHECKSUM_KEY: checksum(text, tensors)}))
    return str(path)


# ---- reading ----------------------------------------------------------------------------------
def _check(ok: bool, what: str, exc=_Bad) -> None:
    if not ok:
        raise exc(what)


def _is_list(x, item=None, n=None) -> bool:
    return isinstance(x, list) and (n is None or len(x) == n) and (item is None or all(item(v) for v in x))


# predicates on JSON values: a whole number (not a bool), text, a coordinate label, an [h, w] grid
_is_int, _is_str = (lambda x: type(x) is int), (lambda x: isinstance(x, str))
_is_label = lambda x: x is None or type(x) in (str, int, float)  # noqa: E731
_is_grid = lambda x: _is_list(x, lambda v: _is_int(v) and v >= 0, 2)  # noqa: E731


def _is_bare_name_or_absent(meta) -> bool:
    run = meta.get("run") if isinstance(meta, dict) else None
    name = run.get("image") if isinstance(run, dict) else None
    return name is None or (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
                            and PurePosixPath(name).name == name and PureWindowsPath(name).name == name)


_TOKEN_FIELDS = {"position": _is_int, "encoder": _is_str, "kind": _is_str, "token": _is_str, "token_id": _is_int,
                 "word": lambda v: v is None or _is_str(v), "word_index": lambda v: v is None or _is_int(v)}


def _validate(header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Check every header field's type and every tensor's shape; raises ``_Bad`` naming the field."""
    _check(isinstance(header.get("stats"), dict), "'stats' must be an object")
    for name, d in header["stats"].items():
        where, t = f"stats.{name}", tensors.get(f"stat/{name}")
        _check(isinstance(d, dict) and t is not None, f"{where}: not an object, or tensor 'stat/{name}' is missing")
        dims, coords, aux = d.get("dims"), d.get("coords", {}), d.get("aux", {})
        _check(_is_list(dims, _is_str) and len(set(dims)) == len(dims), f"{where}.dims must be a list of distinct names")
        _check(t.is_floating_point() and t.dim() == len(dims),
               f"{where}: tensor {tuple(t.shape)} does not match dims {dims}")
        size = dict(zip(dims, t.shape))
        _check(isinstance(d.get("recorded", False), bool), f"{where}.recorded must be true or false")
        if d.get("recorded", False):
            m = tensors.get(f"recorded/{name}")
            _check(m is not None and m.dtype == torch.uint8 and m.shape == t.shape,
                   f"{where}: tensor 'recorded/{name}' is missing or not a uint8 mask shaped like the values")
        _check(isinstance(coords, dict) and isinstance(aux, dict), f"{where}: coords and aux must be objects")
        for dim, labels in coords.items():
            _check(dim in size and _is_list(labels, _is_label, size[dim]), f"{where}.coords.{dim}: not a dim, "
                   f"or not a list of {size.get(dim)} labels (str, number or null)")
        for key, pair in aux.items():
            ok = (_is_list(pair, n=2) and _is_str(pair[0]) and pair[0] in size
                  and _is_list(pair[1], _is_label, size[pair[0]]))
            _check(ok, f"{where}.aux.{key} must be [dim, list of one label per entry of that dim]")
    _check(_is_list(header.get("maps"), lambda m: isinstance(m, dict)), "'maps' must be a list of objects")
    seen_keys, seen_tensors = set(), set()
    for i, m in enumerate(header["maps"]):
        key, name = m.get("key"), m.get("tensor")
        ok = _is_list(key, n=4) and _is_int(key[0]) and _is_int(key[1]) and _is_str(key[2]) and _is_str(key[3])
        _check(ok and tuple(key) not in seen_keys, f"maps[{i}].key must be a new [step, layer, attention, quadrant]")
        _check(_is_str(name) and name.startswith("map/") and name in tensors and name not in seen_tensors,
               f"maps[{i}].tensor must name a 'map/…' tensor of the file, once")
        seen_keys.add(tuple(key))
        seen_tensors.add(name)
        t = tensors[name]
        _check(t.is_floating_point() and t.dim() == 4,
               f"maps[{i}]: tensor {tuple(t.shape)} is not [batch, head, query, key]")
        for field, axis in (("batch", 0), ("heads", 1)):
            _check(field not in m or _is_list(m[field], _is_label, t.shape[axis]),
                   f"maps[{i}].{field} must list {t.shape[axis]} labels")
    lay = header.get("layouts")
    _check(isinstance(lay, dict) and _is_list(lay.get("distinct"), lambda v: isinstance(v, dict)),
           "'layouts' must be an object with a list 'distinct'")
    for i, d in enumerate(lay["distinct"]):
        ok = (_is_grid(d.get("image_grid")) and _is_list(d.get("order"), _is_str, 2)
              and (d.get("prompt") is None or _is_str(d["prompt"])) and isinstance(d.get("has_t5", True), bool)
              and (d.get("context_grid") is None or _is_grid(d["context_grid"])))
        _check(ok, f"layouts.distinct[{i}]: image_grid, order, prompt, has_t5 or context_grid has the wrong type")
        cols = d.get("text")
        _check(isinstance(cols, dict) and set(cols) == set(_TOKEN_FIELDS), f"layouts.distinct[{i}].text must "
               f"have the columns {sorted(_TOKEN_FIELDS)}")
        n = len(cols["position"]) if isinstance(cols["position"], list) else -1
        for f, ok_item in _TOKEN_FIELDS.items():
            _check(_is_list(cols[f], ok_item, n), f"layouts.distinct[{i}].text.{f}: wrong type or length")
    n_distinct = len(lay["distinct"])
    _check(_is_list(lay.get("rows"), lambda r: r is None or (_is_int(r) and 0 <= r < n_distinct)),
           f"layouts.rows must be a list of None or indices 0 … {n_distinct - 1}")
    _check(isinstance(header.get("meta", {}), dict), "'meta' must be an object")
    meta = header.get("meta", {})
    _check(meta.get("image_grid") is None or _is_grid(meta["image_grid"]), "meta.image_grid must be [h, w]")
    _check(meta.get("run") is None or isinstance(meta["run"], dict), "meta.run must be an object")
    _check(_is_bare_name_or_absent(header.get("meta", {})), "meta.run.image must be a bare file name (no folder, "
           "no '..', not absolute): it names the image next to the results file")


def read_result(path) -> tuple[dict, dict, dict, list, dict]:
    """``(stats, maps, map_meta, layouts, meta)`` of a results file; ``AttentionResult.load`` builds the result."""
    path = Path(path)
    try:
        data = path.read_bytes()  # the one open: a file replaced meanwhile cannot mix two versions
    except FileNotFoundError:
        raise FileNotFoundError(f"no results file at {path}; save one with result.save(path) or `mmdit-probe record`") from None
    try:
        tensors = load_tensors(data)
        n = int.from_bytes(data[:8], "little")
        file_meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise ResultsFileError(f"{path} is not a readable safetensors file (truncated, corrupt or another format: "
                               f"{err}); {RECORD_AGAIN}") from err
    if HEADER_KEY not in file_meta:
        raise ResultsFileError(f"{path} is a safetensors file but not an mmdit_probe result (no {HEADER_KEY!r} "
                               f"header; written by another program): load it with safetensors, not AttentionResult")
    text = file_meta[HEADER_KEY]
    try:
        header = json.loads(text)
    except ValueError as err:
        raise ResultsFileError(f"{path}: the mmdit_probe header is not valid JSON ({err}); {RECORD_AGAIN}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ResultsFileError(f"{path} is a safetensors file but not an mmdit_probe result (format {fmt!r}); "
                               f"load it with safetensors, not AttentionResult")
    version = header.get("version")
    if not _is_int(version) or version < 1:
        raise ResultsFileError(f"{path}: invalid results format version {version!r} (a whole number >= 1 is "
                               f"expected): the header is damaged; {RECORD_AGAIN}")
    if version > VERSION:
        raise ResultsFileError(f"{path} was written by a newer mmdit_probe (results format version {version}; this "
                               f"release reads up to {VERSION}): upgrade mmdit_probe (pip install -U mmdit_probe)")
    if version >= 2 and file_meta.get(CHECKSUM_KEY) != checksum(text, tensors):
        raise ResultsFileError(f"{path}: checksum missing or wrong - the tensor data or header changed after it "
                               f"was saved (disk or transfer damage, or an edit); {RECORD_AGAIN}")
    if version < 2:
        warnings.warn(f"{path} is a version-{version} results file without a checksum: damage to it cannot be "
                      f"detected. Re-save it (AttentionResult.load(path).save(path)) to add one.", UserWarning,
                      stacklevel=3)
    try:
        _validate(header, tensors)
    except _Bad as err:
        raise ResultsFileError(f"{path}: malformed results header: {err}; {RECORD_AGAIN}") from None
    stats = {}
    for name, d in header["stats"].items():
        coords = {k: tuple(v) for k, v in d.get("coords", {}).items()}
        aux = {k: (v[0], tuple(v[1])) for k, v in d.get("aux", {}).items()}
        mask = tensors[f"recorded/{name}"].bool() if d.get("recorded", False) else None
        stats[name] = Stat(tensors[f"stat/{name}"], tuple(d["dims"]), coords, aux, mask)
    maps, map_meta = {}, {}
    for m in header["maps"]:
        key = tuple(m["key"])
        maps[key] = tensors[m["tensor"]]
        map_meta[key] = {k: v for k, v in m.items() if k not in ("key", "tensor")}
    distinct = [layout_from_json(d) for d in header["layouts"]["distinct"]]
    layouts = [distinct[i] if i is not None else None for i in header["layouts"]["rows"]]
    return stats, maps, map_meta, layouts, header.get("meta", {})

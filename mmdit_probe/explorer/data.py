"""The explorer page's data (a JSON-able dict) from an :class:`~mmdit_probe.AttentionResult`.

Quadrant and group masses are small: they are carried per layer × step (× head for the head grid),
averaged over the rows of each CFG branch. Word maps are large: they are carried only for the chosen
words, layers, steps, heads and branches (plus the means over all layers, all steps and all heads),
as 8-bit images with one scale per map: ``value = byte / 254 * scale``, byte 255 = missing.
"""

from __future__ import annotations

import base64
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..layout import TEXT_GROUPS, normalise_word
from ..maps import QUADRANTS, parse_quadrant

NAN_BYTE = 255
#: Readable names of the text key groups (as in :mod:`mmdit_probe.plot`, which imports matplotlib).
GROUP_LABELS = {
    "clip_real": "CLIP prompt tokens", "clip_special": "CLIP special (BOS/EOS)", "clip_padding": "CLIP padding",
    "t5_real": "T5 prompt tokens", "t5_special": "T5 special (EOS)", "t5_padding": "T5 padding",
}


@dataclass(frozen=True)
class WordSelection:
    """What the page carries of the word maps: maps for every word × (layer-mean + ``layers``) ×
    (``steps`` + step-mean) × (head-mean + ``heads``) × branch."""

    words: tuple[str, ...]
    layers: tuple[int, ...]
    steps: tuple[int, ...]
    heads: tuple[int, ...]
    branches: tuple[str, ...]
    grid: tuple[int, int]

    @property
    def n_maps(self) -> int:
        return len(self.words) * (len(self.layers) + 1) * (len(self.steps) + 1) * (len(self.heads) + 1) * len(self.branches)

    @property
    def nbytes(self) -> int:
        """Bytes the maps take in the page (base64 of one byte per image token, plus a scale per map)."""
        return self.n_maps * (4 * math.ceil(self.grid[0] * self.grid[1] / 3) + 10)

    def describe(self) -> str:
        h, w = self.grid
        return (f"{len(self.words)} word(s) × {len(self.layers)}+1 layer options × {len(self.steps)}+1 step options × "
                f"{len(self.heads)}+1 head options × {len(self.branches)} branch(es) × {h}×{w} image tokens")


def branch_rows(res: Any) -> dict[str, list[int]]:
    """CFG branch name → its batch rows (indices), cond first; rows without a branch count as cond."""
    names = res.branches or ("cond",) * res.mass.shape["batch"]
    out: dict[str, list[int]] = {}
    for i, b in enumerate(names):
        out.setdefault(b, []).append(i)
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "cond"))


def pick_branches(res: Any, branch: str | Sequence[str] | None) -> tuple[str, ...]:
    """The branches to carry: all (None) or those named."""
    have = branch_rows(res)
    if branch is None:
        return tuple(have)
    wanted = (branch,) if isinstance(branch, str) else tuple(branch)
    missing = [b for b in wanted if b not in have]
    if missing or not wanted:
        raise ValueError(f"branch {missing or wanted} not in this result; branches: {list(have)}")
    return wanted


def _pick(what: str, given: Sequence[int] | int | None, available: Sequence[int]) -> tuple[int, ...]:
    """``given`` checked against ``available`` (None: all of them), in the order given, without repeats."""
    if given is None:
        return tuple(available)
    given = [given] if isinstance(given, (int, np.integer)) else list(given)
    bad = [g for g in given if g not in available]
    if bad:
        raise ValueError(f"{what} {bad} not recorded; recorded {what}s: {list(available)}")
    return tuple(dict.fromkeys(int(g) for g in given))


def plan_words(res: Any, words: Sequence[str] | str | None = None, layers: Sequence[int] | int | None = None,
               steps: Sequence[int] | int | None = None, heads: Sequence[int] | int | str | None = None,
               branches: Sequence[str] = ("cond",)) -> WordSelection | None:
    """Check the word-map selection against what was recorded (None: no word maps in ``res``, or ``words=[]``)."""
    if "word_map" not in res.stats:
        return None
    st = res.stat("word_map")
    recorded = list(st.labels("word"))
    if words is None:
        chosen = recorded
    elif not isinstance(words, str) and not len(words):
        return None  # words=[]: no word maps on the page
    else:
        chosen = [normalise_word(w) for w in ([words] if isinstance(words, str) else words)]
        bad = [w for w in chosen if w not in recorded]
        if bad:
            raise ValueError(f"word(s) {bad} were not recorded; recorded words: {', '.join(recorded)}")
    if "head" in st.dims:
        head_list = _pick("head", None if isinstance(heads, str) and heads == "all" else (heads or []), st.labels("head"))
    elif heads:
        raise ValueError("the word maps were recorded as head means; record AttentionRecorder(..., words=True, "
                         "word_heads='all') to look at single heads")
    else:
        head_list = ()
    return WordSelection(tuple(dict.fromkeys(chosen)), _pick("layer", layers, st.labels("layer")),
                         _pick("step", steps, st.labels("step")), head_list, tuple(branches), tuple(res.image_grid))


def _nanmean(a: np.ndarray, axis: int | tuple[int, ...], keepdims: bool = False) -> np.ndarray:
    with warnings.catch_warnings():  # all-missing slices (a skipped layer) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis, keepdims=keepdims)


def numbers(a: Any, digits: int = 5) -> Any:
    """Nested lists of ``a`` rounded to ``digits`` decimals, NaN as None (JSON null)."""
    a = np.asarray(a, dtype=np.float64)
    out = np.round(a, digits).astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


def _values(st: Any, **selection: Any) -> tuple[np.ndarray, tuple[str, ...]]:
    st = st.sel(**selection)
    return st.values.detach().float().cpu().numpy(), st.dims


def quadrant_data(res: Any, branches: Sequence[str]) -> tuple[dict, dict]:
    """``(quadrant_map, head_mass)``: branch → quadrant → ``[layer][step]`` (head mean) and ``[layer][step][head]``."""
    rows = branch_rows(res)
    qmap: dict[str, dict] = {}
    heads: dict[str, dict] = {}
    for b in branches:
        vals, dims = _values(res.mass, attention="attn", batch=[res.batch_labels[r] for r in rows[b]])
        vals = _nanmean(vals, dims.index("batch"))  # [step, layer, head, query, key]
        qmap[b], heads[b] = {}, {}
        for quad in QUADRANTS:
            q, k = parse_quadrant(quad)
            if q not in res.mass.labels("query") or k not in res.mass.labels("key"):
                continue
            per_head = vals[:, :, :, list(res.mass.labels("query")).index(q), list(res.mass.labels("key")).index(k)]
            per_head = per_head.transpose(1, 0, 2)  # [layer, step, head]
            qmap[b][quad] = numbers(_nanmean(per_head, 2))
            heads[b][quad] = numbers(per_head)
    return qmap, heads


def group_data(res: Any, branches: Sequence[str]) -> dict | None:
    """Image queries' mass on each text key group that has tokens: branch → ``[group][layer][step]`` (head mean)."""
    if "group_mass" not in res.stats:
        return None
    rows = branch_rows(res)
    layouts = [l for l in res.layouts if l is not None]
    present = [g for g in TEXT_GROUPS if not layouts or any(l.group_positions(g) for l in layouts)]
    st = res.stat("group_mass")
    values = {}
    for b in branches:
        vals, dims = _values(st, attention="attn", query="image", key_group=present,
                             batch=[res.batch_labels[r] for r in rows[b]])
        vals = _nanmean(vals, (dims.index("batch"), dims.index("head")))  # [step, layer, group]
        values[b] = numbers(vals.transpose(2, 1, 0))
    return {"groups": present, "labels": [GROUP_LABELS[g] for g in present], "values": values}


def encode_maps(maps: np.ndarray) -> tuple[str, list]:
    """``[..., n]`` float maps → (base64 of the 8-bit maps, one scale per map)."""
    flat = maps.reshape(-1, maps.shape[-1])
    finite = np.isfinite(flat)
    scale = np.where(finite.any(axis=1), np.nanmax(np.where(finite, flat, -np.inf), axis=1), 0.0)
    scale = np.maximum(scale, 0.0)
    q = np.where(scale[:, None] > 0, np.nan_to_num(flat) / np.where(scale > 0, scale, 1.0)[:, None], 0.0)
    q = np.clip(np.rint(q * (NAN_BYTE - 1)), 0, NAN_BYTE - 1).astype(np.uint8)
    q[~finite] = NAN_BYTE
    return base64.b64encode(q.tobytes()).decode("ascii"), [float(f"{s:.6g}") for s in scale]


def word_data(res: Any, sel: WordSelection) -> dict:
    """Word maps of ``sel``: branch → word → ``{"b64", "scale"}`` with maps ordered
    ``[layer option][step option][head option][image token]`` (layer options: mean, then ``sel.layers``;
    step options: ``sel.steps``, then mean; head options: mean, then ``sel.heads``)."""
    st = res.stat("word_map")
    rows = branch_rows(res)
    lay_idx = [list(st.labels("layer")).index(l) for l in sel.layers]
    step_idx = [list(st.labels("step")).index(s) for s in sel.steps]
    maps: dict[str, dict] = {}
    for b in sel.branches:
        vals, dims = _values(st, attention="attn", word=list(sel.words), batch=[res.batch_labels[r] for r in rows[b]])
        x = _nanmean(vals, dims.index("batch"))
        if "head" not in dims:
            x = x[:, :, None]  # [step, layer, head, word, token]
        else:
            head_idx = [list(st.labels("head")).index(h) for h in sel.heads]
            x = np.concatenate([_nanmean(x, 2, keepdims=True), x[:, :, head_idx]], axis=2)
        x = np.concatenate([_nanmean(x, 1, keepdims=True), x[:, lay_idx]], axis=1)
        x = np.concatenate([x[step_idx], _nanmean(x, 0, keepdims=True)], axis=0)
        x = x.transpose(3, 1, 0, 2, 4)  # [word, layer opt, step opt, head opt, token]
        maps[b] = {}
        for i, w in enumerate(sel.words):
            b64, scale = encode_maps(x[i])
            maps[b][w] = {"b64": b64, "scale": scale}
    return {"words": list(sel.words), "grid": list(sel.grid), "layers": list(sel.layers), "steps": list(sel.steps),
            "heads": list(sel.heads), "per_head_recorded": "head" in st.dims, "maps": maps}


def _layer_kinds(kinds: Sequence[str], layers: list) -> list[str] | None:
    """Block kind per layer (joint / single) when the model has single-stream blocks (Flux), else None."""
    if len(kinds) != len(layers):  # kinds of every block, layers a recorded subset
        kinds = [kinds[l] if isinstance(l, int) and l < len(kinds) else "?" for l in layers]
    return list(kinds) if any(k != "joint" for k in kinds) else None


def result_data(res: Any, words: WordSelection | None, branches: Sequence[str], maps: bool = True) -> dict:
    """Everything the result page shows (without the image), JSON-able; ``maps=False``: without the
    word maps (``word_data(res, words)`` gives them)."""
    mass = res.mass
    kinds = mass.aux.get("block_kind")
    layers = list(mass.labels("layer"))
    qmap, heads = quadrant_data(res, branches)
    run = dict(res.meta.get("run", {}))
    prompts = [l.prompt for l in res.layouts if l is not None and l.prompt]
    notes = []
    if words is None:
        notes.append("Word maps left out (words=[])." if "word_map" in res.stats else
                     "No word maps in this result: record with AttentionRecorder(pipe, words=True).")
    if "group_mass" not in res.stats:
        notes.append("No text-group masses in this result: record with AttentionRecorder(pipe, groups=True).")
    return {
        "kind": "result",
        "info": {"model": res.meta.get("model"), "family": res.meta.get("family"),
                 "prompt": run.get("prompt") or (prompts[0] if prompts else None),
                 "image grid": "×".join(map(str, res.image_grid or ())), "heads": mass.shape.get("head"),
                 **{k: run[k] for k in ("steps", "seed", "guidance") if k in run}},
        "layers": layers, "layer_kind": _layer_kinds(kinds[1] if kinds else (), layers),
        "steps": list(mass.labels("step")), "timesteps": [float(t) for t in res.timesteps],
        "heads": list(mass.labels("head")), "branches": list(branches), "quadrants": list(qmap[branches[0]]),
        "quadrant_map": qmap, "head_mass": heads, "groups": group_data(res, branches),
        "word_maps": word_data(res, words) if words is not None and maps else None, "notes": notes,
    }

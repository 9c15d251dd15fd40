"""What a study accumulates while it streams: :class:`Block` (one setting × statistic × word) and
:class:`StudyState` (all blocks, finished / failed work units), with lossless array (de)serialisation.

A block keeps, for its cells at full resolution (e.g. ``step, layer, attention, branch, head, query,
key``), exact running moments over runs (:class:`~mmdit_probe.study.running.RunningMoments`), and for
each prompt the float64 sum and count of its runs' values per *interval cell* (the full cell without
``head`` unless ``head_intervals``): ``O(prompts × interval cells)`` numbers, what the bootstrap over
prompts needs. A prompt is always run by one rank, its runs in a fixed order (seeds, then settings), so
its sums are the same float64 numbers however the study is split or resumed.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np

from .running import KeyIndex, RunningMoments

__all__ = ["Block", "StudyState", "merge_states", "FORMAT", "VERSION"]

FORMAT = "mmdit_probe.study"
VERSION = 1
INT_COLUMNS = ("step", "layer", "head", "y", "x")


def _key_arrays(frame, columns) -> dict[str, np.ndarray]:
    out = {}
    for c in columns:
        col = frame[c]
        out[c] = col.to_numpy(dtype=np.int64) if c in INT_COLUMNS else np.asarray([str(v) for v in col], dtype=str)
    return out


def _key_frame(arrays: dict[str, np.ndarray], columns) -> Any:
    import pandas as pd

    data = {}
    for c in columns:
        a = arrays[c]
        data[c] = a.astype(np.int64) if c in INT_COLUMNS else pd.array(a.astype(str).tolist(), dtype=object)
    return pd.DataFrame(data, columns=list(columns))


class Block:
    """The cells of one ``(setting, statistic, word)`` (``word`` is ``""`` except for word maps)."""

    def __init__(self, columns: Iterable[str], coarse_columns: Iterable[str]):
        self.columns, self.coarse_columns = tuple(columns), tuple(coarse_columns)
        self.full = KeyIndex(self.columns)
        self.coarse = KeyIndex(self.coarse_columns)
        self.to_coarse = np.zeros(0, dtype=np.int64)
        self.moments = RunningMoments(0)
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, np.ndarray] = {}

    def _sync_coarse(self) -> None:
        n = len(self.to_coarse)
        if len(self.full) > n:
            extra = self.coarse.lookup(self.full.frame.iloc[n:])
            self.to_coarse = np.concatenate([self.to_coarse, extra])

    def _prompt_row(self, prompt: int) -> tuple[np.ndarray, np.ndarray]:
        size = len(self.coarse)
        s, c = self.sums.get(prompt), self.counts.get(prompt)
        if s is None:
            s, c = np.zeros(size), np.zeros(size, dtype=np.int64)
        elif len(s) < size:
            s = np.concatenate([s, np.zeros(size - len(s))])
            c = np.concatenate([c, np.zeros(size - len(c), dtype=np.int64)])
        self.sums[prompt], self.counts[prompt] = s, c
        return s, c

    def add(self, keys, values: np.ndarray, prompt: int) -> None:
        """One run's values (one per row of the key frame ``keys``; NaN = absent) for prompt ``prompt``."""
        values = np.asarray(values, dtype=np.float64)
        idx = self.full.lookup(keys)
        self._sync_coarse()
        self.moments.grow(len(self.full))
        self.moments.add(idx, values)
        ok = ~np.isnan(values)
        g = self.to_coarse[idx[ok]]
        size = len(self.coarse)
        s, c = self._prompt_row(prompt)
        s += np.bincount(g, weights=values[ok], minlength=size)
        c += np.bincount(g, minlength=size)

    # ---- arrays ----------------------------------------------------------------------------------
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}key.{k}": v for k, v in _key_arrays(self.full.frame, self.columns).items()}
        out.update(self.moments.to_arrays(f"{prefix}m."))
        prompts = np.array(sorted(self.sums), dtype=np.int64)
        for p in prompts:
            self._prompt_row(int(p))  # pad every row to the current width
        size = len(self.coarse)
        out[f"{prefix}prompts"] = prompts
        out[f"{prefix}sums"] = np.stack([self.sums[int(p)] for p in prompts]) if len(prompts) else np.zeros((0, size))
        out[f"{prefix}counts"] = (np.stack([self.counts[int(p)] for p in prompts]) if len(prompts)
                                  else np.zeros((0, size), dtype=np.int64))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, columns, coarse_columns) -> "Block":
        b = cls(columns, coarse_columns)
        frame = _key_frame({c: arrays[f"{prefix}key.{c}"] for c in b.columns}, b.columns)
        if len(frame):
            b.full.lookup(frame)
            b._sync_coarse()
        b.moments = RunningMoments.from_arrays(arrays, f"{prefix}m.")
        sums, counts = np.asarray(arrays[f"{prefix}sums"], np.float64), np.asarray(arrays[f"{prefix}counts"], np.int64)
        if len(b.moments) != len(b.full) or sums.shape[1:] != (len(b.coarse),) or counts.shape != sums.shape:
            raise ValueError("inconsistent block arrays")
        for i, p in enumerate(np.asarray(arrays[f"{prefix}prompts"], np.int64)):
            b.sums[int(p)], b.counts[int(p)] = sums[i].copy(), counts[i].copy()
        return b


class StudyState:
    """Everything one rank (or a merge) holds: blocks by ``(setting, statistic, word)``, finished units
    ``(prompt, seed, setting index)``, failures, and per-setting run facts (timesteps, image grid, block kinds)."""

    def __init__(self, plan: dict):
        self.plan = dict(plan)
        self.blocks: dict[tuple[str, str, str], Block] = {}
        self.done: set[tuple[int, int, int]] = set()
        self.failures: dict[tuple[int, int, int], str] = {}
        self.facts: dict[str, dict] = {}  # setting -> {"timesteps": [...], "image_grid": [h, w], "block_kinds": [...]}
        self.session: dict[str, Any] = {"ran": 0, "skipped": 0, "failed": 0, "complete": False, "id": ""}
        self.extra: dict | None = None  # a merged, saved study: prompts, settings, seeds, options

    def block(self, key: tuple[str, str, str], columns, coarse_columns) -> Block:
        b = self.blocks.get(key)
        if b is None:
            b = self.blocks[key] = Block(columns, coarse_columns)
        elif b.columns != tuple(columns):
            raise ValueError(f"{key}: the statistic's columns changed from {b.columns} to {tuple(columns)}")
        return b

    # ---- arrays ----------------------------------------------------------------------------------
    def to_arrays(self, extra: dict | None = None) -> dict[str, np.ndarray]:
        keys = sorted(self.blocks)
        header = {
            "format": FORMAT, "version": VERSION, "plan": self.plan, "facts": self.facts, "session": self.session,
            "done": sorted([list(k) for k in self.done]),
            "failures": [[*k, v] for k, v in sorted(self.failures.items())],
            "blocks": [{"setting": k[0], "statistic": k[1], "word": k[2], "columns": list(self.blocks[k].columns),
                        "coarse_columns": list(self.blocks[k].coarse_columns)} for k in keys],
            "study": extra,
        }
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        for i, k in enumerate(keys):
            arrays.update(self.blocks[k].to_arrays(f"b{i}."))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "StudyState":
        header = json.loads(bytes(np.asarray(arrays["header"], dtype=np.uint8)).decode())
        if header.get("format") != FORMAT:
            raise ValueError(f"not a study file (format {header.get('format')!r})")
        if header.get("version") != VERSION:
            raise ValueError(f"study file version {header.get('version')} is not {VERSION}; upgrade mmdit_probe")
        st = cls(header["plan"])
        st.facts = header["facts"]
        st.session = header["session"]
        st.extra = header.get("study")
        st.done = {tuple(int(v) for v in k) for k in header["done"]}
        st.failures = {(int(p), int(s), int(i)): str(msg) for p, s, i, msg in header["failures"]}
        for i, b in enumerate(header["blocks"]):
            st.blocks[(b["setting"], b["statistic"], b["word"])] = Block.from_arrays(
                arrays, f"b{i}.", b["columns"], b["coarse_columns"])
        return st


def merge_states(states: list[StudyState]) -> StudyState:
    """One state from the ranks' states, in the order given, with every block's cells in canonical
    (sorted-key) order, so the result does not depend on how the work was split.

    Moments add exactly; prompts are disjoint across ranks (a prompt is one rank's).
    """
    if not states:
        raise ValueError("nothing to merge")
    out = StudyState(states[0].plan)
    out.session = {"ran": 0, "skipped": 0, "failed": 0, "complete": all(s.session.get("complete") for s in states),
                   "id": states[0].session.get("id", "")}
    keys = sorted({k for s in states for k in s.blocks})
    for st in states:
        if st.plan != out.plan:
            raise ValueError("the shards belong to different studies (their plans differ)")
        overlap = out.done & st.done
        if overlap:
            raise ValueError(f"work unit(s) {sorted(overlap)[:3]} finished in two shards")
        out.done |= st.done
        out.failures.update(st.failures)
        for k in ("ran", "skipped", "failed"):
            out.session[k] += int(st.session.get(k, 0))
        for name, facts in st.facts.items():
            out.facts.setdefault(name, facts)
    for k in out.done:
        out.failures.pop(k, None)
    for key in keys:
        parts = [s.blocks[key] for s in states if key in s.blocks]
        out.blocks[key] = _merge_blocks(parts)
    return out


def _merge_blocks(parts: list[Block]) -> Block:
    import pandas as pd

    cols, ccols = parts[0].columns, parts[0].coarse_columns
    frames = [p.full.frame for p in parts if len(p.full)]
    union = pd.concat(frames, ignore_index=True).drop_duplicates(ignore_index=True) if frames else None
    merged = Block(cols, ccols)
    if union is not None:
        union = union.sort_values(list(cols), kind="mergesort", ignore_index=True)
        merged.full.lookup(union)
        merged._sync_coarse()
        # the coarse cells of a sorted full index are not sorted themselves: renumber them sorted
        order = merged.coarse.sorted_order()
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        merged.coarse = KeyIndex(ccols, merged.coarse.frame.iloc[order].reset_index(drop=True))
        merged.to_coarse = rank[merged.to_coarse]
    merged.moments = RunningMoments(len(merged.full))
    size = len(merged.coarse)
    for p in parts:
        if not len(p.full):
            continue
        idx = merged.full.lookup(p.full.frame)
        merged.moments.merge(p.moments, idx)
        p._sync_coarse()
        cidx = merged.coarse.lookup(p.coarse.frame)
        for prompt in sorted(p.sums):
            if prompt in merged.sums:
                raise ValueError(f"prompt {prompt} has runs in two shards")
            s, c = p._prompt_row(prompt)
            ms, mc = np.zeros(size), np.zeros(size, dtype=np.int64)
            ms[cidx], mc[cidx] = s, c
            merged.sums[prompt], merged.counts[prompt] = ms, mc
    merged.full._last = merged.coarse._last = None
    return merged

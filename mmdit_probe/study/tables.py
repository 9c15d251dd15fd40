"""``Study``: the merged result of :func:`~mmdit_probe.study.study` — tables with bootstrap intervals.

* :meth:`Study.summary`: per cell (any coarsening of ``step, layer, attention, branch, query, key``, or
  ``head`` with ``head_intervals=True``; prompt metadata columns split the prompts) the mean over
  prompts of each prompt's mean, the percentile bootstrap interval over prompts, ``std`` (over prompt
  means) and ``n`` (prompts).
* :meth:`Study.difference`: setting ``b`` − setting ``a`` paired by prompt and seed, same columns.
* :meth:`Study.moments`: the streaming per-run mean and standard deviation of every full cell (per head).
* :meth:`Study.word_maps`: aligned word maps (mean over the prompts naming the word) with intervals.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bootstrap import bootstrap_mean
from .state import StudyState

__all__ = ["Study", "run_rows"]

CELL_STATS = ("mass", "group_mass", "entropy")
RUN_COLUMNS = ["prompt_index", "prompt", "seed", "setting", "statistic", "word", "step", "layer", "attention",
               "branch", "head", "query", "key", "y", "x", "value"]


def run_rows(pieces: list, prompts: Any, p: int, seed: int, setting: str) -> Any:
    """One run's values as rows (``Study.runs``): ``prompt_index, prompt, seed, setting, statistic, word,``
    the cell columns, ``value``, then the prompt's metadata columns."""
    import pandas as pd

    frames = []
    for stat, word, keys, values in pieces:
        f = keys.copy()
        f["statistic"], f["word"], f["value"] = stat, word, values
        frames.append(f)
    rows = pd.concat(frames, ignore_index=True)
    meta = prompts.iloc[p]
    rows["prompt_index"], rows["prompt"], rows["seed"], rows["setting"] = p, meta["prompt"], seed, setting
    cols = [c for c in RUN_COLUMNS if c in rows.columns]
    rows = rows[cols]
    for c in ("step", "layer", "head", "y", "x"):
        if c in rows.columns:
            rows[c] = rows[c].astype("Int64")  # missing for the statistics without that dim
    for c in prompts.columns[1:]:
        rows[c] = meta[c]
    return rows


class Study:
    """Merged study: ``prompts`` (DataFrame), ``settings`` (names, the first is the reference), ``seeds``,
    ``statistics``, ``runs`` (per-run rows with ``keep_runs=True``, else None) and the tables below."""

    def __init__(self, state: StudyState, prompts: Any, settings: Sequence[str], seeds: Sequence[int],
                 options: dict | None = None, runs: Any = None):
        self.state = state
        self.prompts = prompts
        self.settings = list(settings)
        self.seeds = list(seeds)
        self.options = {"level": 0.95, "n_boot": 2000, "bootstrap_seed": 0, **(options or {})}
        self.runs = runs

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def statistics(self) -> list[str]:
        return list(self.state.plan.get("statistics", []))

    @property
    def words(self) -> list[str]:
        """Words with word maps (any setting), sorted."""
        return sorted({k[2] for k in self.state.blocks if k[1] == "word_map"})

    def word_counts(self, setting: str | None = None) -> dict[str, int]:
        """Prompts with a word map of each word (``setting``: default the first), most frequent first."""
        name = self._setting(setting)
        counts = {k[2]: len(b.sums) for k, b in self.state.blocks.items() if k[0] == name and k[1] == "word_map"}
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def image_grid(self, setting: str | None = None) -> tuple[int, int]:
        grid = self.state.facts.get(setting or self.settings[0], {}).get("image_grid")
        if not grid:
            raise KeyError(f"no run of setting {setting or self.settings[0]!r} finished")
        return tuple(grid)

    @property
    def report(self) -> dict:
        """``total, done, ran, skipped, failed`` unit counts and ``failures`` (``(prompt, seed, setting) → error``)."""
        s = self.state.session
        total = len(self.prompts) * len(self.seeds) * len(self.settings)
        return {"total": total, "done": len(self.state.done), "ran": int(s.get("ran", 0)),
                "skipped": int(s.get("skipped", 0)), "failed": len(self.state.failures),
                "failures": {(p, sd, self.settings[i]): m for (p, sd, i), m in sorted(self.state.failures.items())}}

    def report_text(self) -> str:
        r = self.report
        lines = [f"study: {r['total']} runs ({len(self.prompts)} prompts x {len(self.seeds)} seeds x "
                 f"{len(self.settings)} settings): {r['ran']} run now, {r['skipped']} skipped (finished before), "
                 f"{r['failed']} failed, {r['total'] - r['done'] - r['failed']} not run"]
        for (p, sd, name), msg in list(r["failures"].items())[:5]:
            lines.append(f"  failed: prompt {p} {self.prompts['prompt'].iloc[p]!r}, seed {sd}, {name}: {msg}")
        if r["failed"] > 5:
            lines.append(f"  ... and {r['failed'] - 5} more failures (Study.report['failures'])")
        return "\n".join(lines)

    def __repr__(self) -> str:
        r = self.report
        return (f"Study({len(self.prompts)} prompts, seeds {self.seeds}, settings {self.settings}, "
                f"statistics {self.statistics}; {r['done']}/{r['total']} runs done, {r['failed']} failed)")

    # ---- selection helpers ------------------------------------------------------------------------
    def _setting(self, name: str | None) -> str:
        name = self.settings[0] if name is None else name
        if name not in self.settings:
            raise KeyError(f"no setting {name!r}; settings: {self.settings}")
        return name

    def _blocks(self, setting: str, statistic: str | Sequence[str] | None, words: Sequence[str] | None = None):
        stats = [s for s in self.statistics if s in CELL_STATS] if statistic is None else (
            [statistic] if isinstance(statistic, str) else list(statistic))
        missing = [s for s in stats if s not in self.statistics]
        if missing:
            raise KeyError(f"statistic(s) {missing} were not recorded; this study has {self.statistics}")
        keys = [k for k in sorted(self.state.blocks) if k[0] == setting and k[1] in stats
                and (k[1] != "word_map" or words is None or k[2] in words)]
        return [(k, self.state.blocks[k]) for k in sorted(keys, key=lambda k: (stats.index(k[1]), k[2]))]

    def _meta_columns(self) -> list[str]:
        return [c for c in self.prompts.columns if c != "prompt"]

    def _split_by(self, block, by: Sequence[str] | None) -> tuple[list[str], list[str]]:
        cols = list(block.coarse_columns)
        if by is None:
            return cols, []
        by = [by] if isinstance(by, str) else list(by)
        meta = self._meta_columns()
        unknown = [c for c in by if c not in cols and c not in meta]
        if unknown:
            hint = " (record with head_intervals=True to keep heads)" if "head" in unknown else ""
            raise KeyError(f"cannot group by {unknown}{hint}; cell columns: {cols}; prompt columns: {meta}")
        return [c for c in by if c in cols], [c for c in by if c in meta]

    def _pooled(self, block, by: list[str], where: dict | None, cells: np.ndarray | None = None):
        """``(group keys, prompt indices, values [prompts, groups])``: each prompt's mean over the runs and
        the interval cells of each group of ``by`` (restricted to ``where`` and the mask ``cells``)."""
        import pandas as pd

        frame = block.coarse.frame
        prompts = np.array(sorted(block.sums), dtype=np.int64)
        mask = np.ones(len(frame), dtype=bool) if cells is None else cells.copy()
        for col, val in (where or {}).items():
            if col not in frame.columns:
                raise KeyError(f"where: no cell column {col!r}; columns: {list(frame.columns)}")
            vals = val if isinstance(val, (list, tuple, set)) else [val]
            mask &= frame[col].isin(list(vals)).to_numpy()
        cols = np.flatnonzero(mask)
        if by:
            g = frame.iloc[cols].groupby(by, sort=True)
            codes = g.ngroup().to_numpy()
            keys = g.size().reset_index()[by]
        else:
            codes = np.zeros(len(cols), dtype=np.int64)
            keys = pd.DataFrame(index=[0] if len(cols) else [])
        if not len(cols) or not len(prompts):
            return keys.iloc[:0], prompts, np.zeros((len(prompts), 0))
        order = np.argsort(codes, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(codes[order])) + 1]
        sums = np.stack([block.sums[int(p)] for p in prompts])[:, cols[order]]
        counts = np.stack([block.counts[int(p)] for p in prompts])[:, cols[order]]
        s = np.add.reduceat(sums, starts, axis=1)
        c = np.add.reduceat(counts, starts, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(c > 0, s / np.maximum(c, 1), np.nan)
        return keys.reset_index(drop=True), prompts, values

    def _interval_rows(self, keys, values: np.ndarray, level, n_boot, seed) -> Any:
        mean, low, high, n = bootstrap_mean(values, level, n_boot, seed)
        out = keys.copy()
        out["mean"], out["ci_low"], out["ci_high"] = mean, low, high
        out["std"] = _std(values)
        out["n"] = n.astype(np.int64)
        return out

    def _opts(self, level, n_boot, seed) -> tuple[float, int, int]:
        o = self.options
        return (o["level"] if level is None else level, o["n_boot"] if n_boot is None else n_boot,
                o["bootstrap_seed"] if seed is None else seed)

    def _decorate(self, df, setting: str, stat: str, word: str, front: list[str]) -> Any:
        df.insert(0, "statistic", stat)
        if stat == "word_map":
            df.insert(1, "word", word)
        if "step" in df.columns:
            ts = self.state.facts.get(setting, {}).get("timesteps", [])
            df.insert(df.columns.get_loc("step") + 1, "timestep",
                      [ts[int(s)] if int(s) < len(ts) else np.nan for s in df["step"]])
        for i, (name, value) in enumerate(front):
            df.insert(i, name, value)
        return df

    # ---- tables -----------------------------------------------------------------------------------
    def summary(self, by: Sequence[str] | None = None, *, setting: str | Sequence[str] | None = None,
                statistic: str | Sequence[str] | None = None, where: dict | None = None,
                level: float | None = None, n_boot: int | None = None, seed: int | None = None) -> Any:
        """Tidy table: ``setting, statistic, <by>, [timestep], mean, ci_low, ci_high, std, n``.

        ``by``: cell columns kept (default all of ``step, layer, attention, branch, query, key``; the
        others are averaged within each prompt) and/or prompt metadata columns (prompts split by them).
        ``mean`` is the mean over prompts of each prompt's mean; ``ci_low``/``ci_high`` the percentile
        bootstrap interval over prompts (``level``, ``n_boot`` replicates, ``seed``); ``n`` prompts.
        ``where={"branch": "cond"}`` keeps only those cells. ``statistic`` defaults to the cell statistics
        (``word_map``: one row per word, branch and pixel).
        """

        level, n_boot, seed = self._opts(level, n_boot, seed)
        names = self.settings if setting is None else [self._setting(setting)] if isinstance(setting, str) else [
            self._setting(s) for s in setting]
        frames = []
        for name in names:
            for (sname, stat, word), block in self._blocks(name, statistic):
                cell_by, meta_by = self._split_by(block, by)
                keys, prompts, values = self._pooled(block, cell_by, where)
                for meta_vals, rows in self._prompt_groups(prompts, meta_by):
                    df = self._interval_rows(keys, values[rows], level, n_boot, seed)
                    for col, v in zip(meta_by, meta_vals):
                        df.insert(0, col, v)
                    frames.append(self._decorate(df, name, stat, word, [("setting", name)]))
        return _concat(frames)

    def prompt_means(self, by: Sequence[str] | None = None, *, setting: str | None = None,
                     statistic: str = "mass", where: dict | None = None) -> Any:
        """Each prompt's mean per group of ``by``: ``prompt_index, prompt, <by>, value`` (what the bootstrap resamples)."""

        name = self._setting(setting)
        frames = []
        for (_, stat, word), block in self._blocks(name, statistic):
            cell_by, _ = self._split_by(block, [c for c in (by or block.coarse_columns) if c in block.coarse_columns])
            keys, prompts, values = self._pooled(block, cell_by, where)
            df = keys.loc[np.tile(np.arange(len(keys)), len(prompts))].reset_index(drop=True)
            df.insert(0, "prompt_index", np.repeat(prompts, len(keys)))
            df.insert(1, "prompt", self.prompts["prompt"].to_numpy()[df["prompt_index"].to_numpy()])
            df["value"] = values.ravel()
            frames.append(self._decorate(df, name, stat, word, [("setting", name)]))
        return _concat(frames)

    def difference(self, a: str | None = None, b: str | None = None, by: Sequence[str] | None = None, *,
                   statistic: str | Sequence[str] | None = None, where: dict | None = None,
                   level: float | None = None, n_boot: int | None = None, seed: int | None = None) -> Any:
        """``b − a`` paired by prompt and seed: ``a, b, statistic, <by>, [timestep], mean_a, mean_b, mean,
        ci_low, ci_high, std, n`` (``mean`` = ``mean_b − mean_a`` over the paired prompts).

        Defaults: ``a`` the first setting, ``b`` the second. Only cells present in both settings count, and
        only prompts whose finished seeds are the same in both (so every prompt's difference is the mean of
        its per-seed differences). Intervals: percentile bootstrap over prompts of the per-prompt differences.
        """
        a = self._setting(a)
        if b is None:
            others = [s for s in self.settings if s != a]
            if not others:
                raise ValueError("this study has one setting; a difference needs two (specs= or settings=)")
            b = others[0]
        b = self._setting(b)
        level, n_boot, seed = self._opts(level, n_boot, seed)
        paired = self._paired_prompts(a, b)
        blocks_b = {(k[1], k[2]): blk for k, blk in self._blocks(b, statistic)}
        frames = []
        for (_, stat, word), ba in self._blocks(a, statistic):
            bb = blocks_b.get((stat, word))
            if bb is None:
                continue
            cell_by, meta_by = self._split_by(ba, by)
            ma, mb = _common_cells(ba, bb)
            ka, pa, va = self._pooled(ba, cell_by, where, ma)
            kb, pb, vb = self._pooled(bb, cell_by, where, mb)
            prompts = np.intersect1d(np.intersect1d(pa, pb), paired)
            va = va[np.searchsorted(pa, prompts)]
            vb = vb[np.searchsorted(pb, prompts)]
            if not ka.equals(kb):
                raise RuntimeError(f"internal: groups of {a!r} and {b!r} differ after restricting to common cells")
            d = vb - va  # the same cells on both sides, grouped alike
            for meta_vals, rows in self._prompt_groups(prompts, meta_by):
                df = self._interval_rows(ka, d[rows], level, n_boot, seed)
                both = ~np.isnan(d[rows])
                df.insert(len(ka.columns), "mean_a", _masked_mean(va[rows], both))
                df.insert(len(ka.columns) + 1, "mean_b", _masked_mean(vb[rows], both))
                for col, v in zip(meta_by, meta_vals):
                    df.insert(0, col, v)
                frames.append(self._decorate(df, a, stat, word, [("a", a), ("b", b)]))
        return _concat(frames)

    def _paired_prompts(self, a: str, b: str) -> np.ndarray:
        ia, ib = self.settings.index(a), self.settings.index(b)
        seeds: dict[tuple[int, int], set] = {}
        for p, sd, i in self.state.done:
            seeds.setdefault((p, i), set()).add(sd)
        ok = [p for p in range(len(self.prompts)) if seeds.get((p, ia)) and seeds.get((p, ia)) == seeds.get((p, ib))]
        return np.array(ok, dtype=np.int64)

    def _prompt_groups(self, prompts: np.ndarray, meta_by: list[str]):
        if not meta_by:
            yield (), np.arange(len(prompts))
            return
        meta = self.prompts.iloc[prompts][meta_by].reset_index(drop=True)
        for vals, rows in meta.groupby(meta_by, sort=True).indices.items():
            yield (vals if isinstance(vals, tuple) else (vals,)), np.asarray(rows)

    def moments(self, setting: str | None = None, statistic: str | Sequence[str] | None = None) -> Any:
        """Per full cell (heads kept): the streaming mean and standard deviation over runs and ``n`` runs,
        ``setting, statistic, <cell columns>, [timestep], mean, std, n`` (exact; see :mod:`~mmdit_probe.study.running`)."""
        names = self.settings if setting is None else [self._setting(setting)]
        frames = []
        for name in names:
            for (_, stat, word), block in self._blocks(name, statistic):
                df = block.full.frame.copy()
                df["mean"], df["std"], df["n"] = block.moments.mean, block.moments.std, block.moments.n
                frames.append(self._decorate(df, name, stat, word, [("setting", name)]))
        return _concat(frames)

    def word_maps(self, setting: str | None = None, words: Sequence[str] | None = None, branch: str | None = "cond",
                  *, level: float | None = None, n_boot: int | None = None, seed: int | None = None) -> Any:
        """Word maps aligned by word: ``word, branch, y, x, mean, ci_low, ci_high, std, n`` (n = prompts
        naming the word), each the mean over those prompts of their head-mean maps."""
        if "word_map" not in self.statistics:
            raise KeyError("word maps were not recorded; add 'word_map' to statistics=")
        name = self._setting(setting)
        level, n_boot, seed = self._opts(level, n_boot, seed)
        frames = []
        for (_, _, word), block in self._blocks(name, "word_map", words):
            keys, prompts, values = self._pooled(block, ["branch", "y", "x"], {"branch": branch} if branch else None)
            frames.append(self._decorate(self._interval_rows(keys, values, level, n_boot, seed), name, "word_map",
                                         word, [("setting", name)]))
        return _concat(frames)

    def word_map(self, word: str, setting: str | None = None, branch: str = "cond", **kw) -> dict[str, np.ndarray]:
        """``{"mean", "ci_low", "ci_high", "n"}`` of one word as ``[h, w]`` arrays (``n``: prompts)."""
        df = self.word_maps(setting, [word], branch, **kw)
        if df is None or not len(df):
            raise KeyError(f"no word map of {word!r}; words: {', '.join(self.words)}")
        h, w = self.image_grid(setting)
        out = {}
        for col in ("mean", "ci_low", "ci_high"):
            grid = np.full((h, w), np.nan)
            grid[df["y"].to_numpy(int), df["x"].to_numpy(int)] = df[col].to_numpy(float)
            out[col] = grid
        out["n"] = int(df["n"].max())
        return out

    # ---- figures (matplotlib / seaborn, imported here only) ----------------------------------------
    def plot_quadrants(self, x: str = "layer", **kw) -> Any:
        """Mass per quadrant against ``x`` (``"layer"`` or ``"step"``) with the interval band; see :mod:`.figures`."""
        from . import figures

        return figures.quadrant_lines(self, x=x, **kw)

    def plot_groups(self, **kw) -> Any:
        """Image-query mass per key group (bars with interval whiskers)."""
        from . import figures

        return figures.group_bars(self, **kw)

    def plot_difference(self, a: str | None = None, b: str | None = None, **kw) -> Any:
        """Difference map ``b − a`` (layer × step, one panel per quadrant); dots mark intervals excluding 0."""
        from . import figures

        return figures.difference_map(self, a, b, **kw)

    def plot_word_maps(self, words: Sequence[str] | None = None, **kw) -> Any:
        """Mean word maps (top) and their interval widths (bottom)."""
        from . import figures

        return figures.word_map_grid(self, words, **kw)

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> str:
        """Write the merged study (state, prompts, settings, seeds, options; not ``runs``) atomically."""
        from .shards import write_shard

        extra = {"prompts": self.prompts.to_json(orient="split", index=False), "settings": self.settings,
                 "seeds": self.seeds, "options": self.options}
        write_shard(path, self.state, extra)
        return str(path)

    @classmethod
    def load(cls, path: str | Path) -> "Study":
        """A study saved by :meth:`save` (``OUT/study.npz``; a folder means its ``study.npz``)."""
        import pandas as pd

        from .shards import read_shard

        path = Path(path)
        if path.is_dir():
            path = path / "study.npz"
        state = read_shard(path)
        extra = state.extra
        if not extra:
            raise ValueError(f"{path} is a shard, not a merged study; open OUT/study.npz")
        prompts = pd.read_json(io.StringIO(extra["prompts"]), orient="split", dtype=False)
        return cls(state, prompts, extra["settings"], extra["seeds"], extra["options"])


def _common_cells(ba, bb) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the interval cells the two blocks share."""
    fa, fb = ba.coarse.frame, bb.coarse.frame
    cols = list(ba.coarse_columns)
    if list(bb.coarse_columns) != cols:
        raise ValueError(f"the settings' cells differ ({cols} vs {list(bb.coarse_columns)})")
    ia = bb.coarse._index.get_indexer(_mi(fa, cols)) if len(fb) and len(fa) else np.full(len(fa), -1)
    ib = ba.coarse._index.get_indexer(_mi(fb, cols)) if len(fb) and len(fa) else np.full(len(fb), -1)
    return np.asarray(ia) >= 0, np.asarray(ib) >= 0


def _mi(frame, cols):
    import pandas as pd

    return pd.MultiIndex.from_frame(frame[cols])


def _std(values: np.ndarray) -> np.ndarray:
    have = ~np.isnan(values)
    n = have.sum(axis=0)
    filled = np.where(have, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / n
        dev = np.where(have, values - mean, 0.0)
        var = (dev ** 2).sum(axis=0) / (n - 1)
    return np.where(n >= 2, np.sqrt(var), np.nan)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mask, values, 0.0).sum(axis=0) / mask.sum(axis=0)


def _concat(frames: list) -> Any:
    import pandas as pd

    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

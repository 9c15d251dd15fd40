"""``study()``: record many runs (prompts × seeds × settings) and aggregate them as they stream.

>>> res = mp.study(pipe, mp.study.shipped_prompts().head(50), seeds=[0, 1], num_inference_steps=20)
>>> res.summary(by=["layer", "branch", "query", "key"])        # mean, ci_low, ci_high, n (prompts)
>>> res.difference("baseline", "skip layer 3", by=["layer", "query", "key"])

On several processes: ``accelerate launch --num_processes N your_script.py`` with ``out=`` a shared
folder (see :mod:`mmdit_probe.study.shards`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .extract import DEFAULT_STATISTICS, check_statistics, run_unit
from .prompts import as_prompt_frame, prompts_fingerprint
from .running import MAX_ABS
from .settings import RESERVED, resolve_settings
from .shards import Ranks, ShardError, find_shards, mark_complete, read_shard, shard_path, wait_for_shards, write_shard
from .state import StudyState, merge_states
from .tables import Study, run_rows

__all__ = ["study"]

ON_ERROR = ("continue", "raise")


def study(pipe: Any, prompts: Any, seeds: int | Sequence[int] = (0,), statistics: Sequence[str] = DEFAULT_STATISTICS,
          specs: Sequence | None = None, *, settings: Any = None, out: str | os.PathLike | None = None,
          resume: bool = True, keep_runs: bool = False, head_intervals: bool = False,
          word_steps: Any = None, word_layers: Any = None, level: float = 0.95, n_boot: int = 2000,
          bootstrap_seed: int = 0, progress: bool = True, on_error: str = "continue",
          checkpoint_every: float = 60.0, **call_kwargs: Any) -> Study:
    """Record every (prompt, seed, setting) run with ``mp.AttentionRecorder`` and aggregate as they stream.

    Args:
        pipe: the pipeline (SD3 / SD3.5 / Flux.1), already on its device.
        prompts: a string, a list of strings, a DataFrame with a ``prompt`` column (other columns are kept
            as prompt metadata), or a ``.csv`` / ``.jsonl`` file (:func:`~mmdit_probe.study.load_prompts`).
        seeds: seeds of the initial noise (``torch.Generator().manual_seed(seed)``); every prompt runs each.
        statistics: any of ``"mass"``, ``"group_mass"``, ``"entropy"``, ``"word_map"``.
        specs: ablation specs (or lists of specs): settings ``baseline`` plus one per entry, each run under
            ``mp.intervene(pipe, *spec)``.
        settings: named settings instead (``{name: Setting | dict of pipeline arguments | [specs]}``); the
            first is the reference of :meth:`Study.difference`. Every setting runs every (prompt, seed).
        out: folder for shards (``OUT/shards``), kept runs and the merged ``OUT/study.npz``; required on
            several processes. Without it everything stays in memory.
        resume: continue from the shards in ``out`` (finished units are skipped); ``False`` refuses existing ones.
        keep_runs: also keep every run's rows (``Study.runs``; files ``OUT/runs/*.csv``). Memory and disk
            then grow with the number of runs; everything else does not.
        head_intervals: keep per-prompt means per head too, so summaries may keep ``head`` (memory × heads).
        word_steps, word_layers: steps / layers averaged into the word maps (default all).
        level, n_boot, bootstrap_seed: defaults of the bootstrap intervals of the summaries.
        progress: one tqdm bar per rank and a final summary line.
        on_error: ``"continue"`` records a failed run and goes on (it is retried on resume); ``"raise"`` stops.
        checkpoint_every: seconds between shard writes (0: after every run); a killed rank loses at most that.
        call_kwargs: pipeline arguments of every run (``num_inference_steps``, ``height``, ...); settings
            override them.

    Returns a :class:`~mmdit_probe.study.Study` (the merged result, on every rank).
    """
    from tqdm.auto import tqdm

    df = as_prompt_frame(prompts)
    seeds = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one; got {seeds}")
    stats = check_statistics(statistics)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    bad = [k for k in call_kwargs if k in RESERVED]
    if bad:
        raise ValueError(f"{bad} are set by the study (prompts and seeds pick them); pass pipeline options only")
    setts = resolve_settings(pipe, specs, settings)
    plan = {
        "prompts": prompts_fingerprint(df), "n_prompts": len(df), "seeds": seeds,
        "settings": [s.fingerprint() for s in setts], "statistics": list(stats), "head_intervals": bool(head_intervals),
        "word_steps": repr(word_steps), "word_layers": repr(word_layers),
        "call_kwargs": {k: repr(v) for k, v in sorted(call_kwargs.items())},
    }
    ranks = Ranks()
    if ranks.world > 1 and out is None:
        raise ValueError(f"this study runs on {ranks.world} processes: pass out= (a folder every process can write)")
    out = Path(out) if out is not None else None
    state = _open_state(out, ranks, plan, resume)
    session = ranks.session_id()
    mine = ranks.split(range(len(df)))
    units = [(p, s, i) for p in mine for s in seeds for i in range(len(setts))]
    skipped = sum(u in state.done for u in units)
    state.session = {"ran": 0, "skipped": skipped, "failed": 0, "complete": False, "id": session}
    path = shard_path(out, ranks.rank, ranks.world) if out is not None else None
    runs: list = []
    desc = f"study {ranks.rank + 1}/{ranks.world}" if ranks.world > 1 else "study"
    last = time.monotonic()
    with tqdm(total=len(units), initial=skipped, desc=desc, unit="run", disable=not progress, position=ranks.rank,
              dynamic_ncols=True) as bar:
        for unit in units:
            if unit in state.done:
                continue
            p, seed, i = unit
            setting = setts[i]
            try:
                pieces, facts = run_unit(pipe, setting, df["prompt"].iloc[p], seed, call_kwargs, stats,
                                         word_steps, word_layers)
                _check_values(pieces)
            except KeyboardInterrupt:  # nothing of this run was added yet: keep what is finished
                if path is not None:
                    write_shard(path, state)
                raise
            except Exception as err:
                if on_error == "raise":
                    if path is not None:
                        write_shard(path, state)
                    raise
                state.failures[unit] = f"{type(err).__name__}: {err}"
                state.session["failed"] += 1
                bar.update(1)
                continue
            for stat, word, keys, values in pieces:
                cols = list(keys.columns)
                coarse = cols if head_intervals else [c for c in cols if c != "head"]
                state.block((setting.name, stat, word), cols, coarse).add(keys, values, p)
            state.facts.setdefault(setting.name, facts)
            if keep_runs:
                rows = run_rows(pieces, df, p, seed, setting.name)
                if out is not None:
                    _write_run(out, unit, rows)
                else:
                    runs.append(rows)
            state.done.add(unit)
            state.failures.pop(unit, None)
            state.session["ran"] += 1
            if path is not None and time.monotonic() - last >= checkpoint_every:
                write_shard(path, state)
                last = time.monotonic()
            bar.update(1)
    state.session["complete"] = True
    if path is not None:
        write_shard(path, state)
        mark_complete(path, session)
    if ranks.world > 1:
        paths = wait_for_shards(out, ranks.world, session)
        states = [state if r == ranks.rank else read_shard(pth) for r, pth in enumerate(paths)]
    else:
        states = [state]
    merged = merge_states(states)
    options = {"level": level, "n_boot": n_boot, "bootstrap_seed": bootstrap_seed}
    run_table = _read_runs(out, merged) if keep_runs and out is not None else (_concat(runs) if keep_runs else None)
    result = Study(merged, df, [s.name for s in setts], seeds, options, runs=run_table)
    if out is not None and ranks.is_main:
        result.save(out / "study.npz")
    if progress and ranks.is_main:
        print(result.report_text(), file=sys.stderr)
    if not merged.done and merged.failures:
        first = next(iter(sorted(merged.failures.items())))
        raise RuntimeError(f"every run of the study failed; the first, {first[0]} (prompt, seed, setting): {first[1]}")
    return result


def _open_state(out: Path | None, ranks: Ranks, plan: dict, resume: bool) -> StudyState:
    if out is None:
        return StudyState(plan)
    found = find_shards(out)
    other = {w: ps for w, ps in found.items() if w != ranks.world}
    if other:
        listing = "; ".join(f"{len(ps)} for {w} process(es)" for w, ps in sorted(other.items()))
        raise ShardError(f"{out / 'shards'} holds shards of a launch on another number of processes ({listing}); "
                         f"resume with that many processes, or choose another out=")
    path = shard_path(out, ranks.rank, ranks.world)
    state = StudyState(plan)
    if path.exists():
        if not resume:
            raise FileExistsError(f"{path} exists: resume the study (resume=True / --resume) or choose another out=")
        state = read_shard(path)
        if state.plan != plan:
            diff = sorted(k for k in set(plan) | set(state.plan) if plan.get(k) != state.plan.get(k))
            raise ShardError(f"{path} belongs to another study (its {', '.join(diff)} differ); choose another out=, "
                             f"or run the same prompts, seeds, settings and options to resume it")
    Path(str(path) + ".done").unlink(missing_ok=True)  # not complete for this launch yet
    return state


def _check_values(pieces: list) -> None:
    for stat, word, _, values in pieces:
        v = values[~np.isnan(values)]
        if len(v) and not (np.all(np.isfinite(v)) and np.abs(v).max() < MAX_ABS):
            raise ValueError(f"{stat}{' ' + word if word else ''}: non-finite or huge values ({v[~np.isfinite(v)][:3]})")


def _run_file(out: Path, unit: tuple[int, int, int]) -> Path:
    p, seed, i = unit
    return out / "runs" / f"run-{p:06d}-{seed}-{i:03d}.csv"


def _write_run(out: Path, unit: tuple[int, int, int], rows: Any) -> None:
    from ..io import atomic_write

    atomic_write(_run_file(out, unit), lambda tmp: rows.to_csv(tmp, index=False))


def _read_runs(out: Path, merged: StudyState) -> Any:
    import pandas as pd

    frames = []
    for unit in sorted(merged.done):
        f = _run_file(out, unit)
        if f.exists():
            frames.append(pd.read_csv(f, keep_default_na=False, na_values={"value": ["", "nan", "NaN"]}))
    return _concat(frames)


def _concat(frames: list) -> Any:
    import pandas as pd

    return pd.concat(frames, ignore_index=True) if frames else None


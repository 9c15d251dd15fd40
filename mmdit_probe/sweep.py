"""``sweep``: run many ablations over prompts and seeds and collect their effects in one long table.

>>> df = mp.sweep(pipe, ["a red circle"], mp.skip_each_layer(pipe), seeds=[0, 1],
...               save_to="skip.csv", num_inference_steps=28)
>>> df.query("metric == 'image_psnr'").pivot_table(index="spec_index", columns="seed", values="value")

Columns: ``prompt, seed, spec, spec_index, metric, step, value`` (``step`` is ``<NA>`` for
final-output metrics). The baseline runs once per (prompt, seed). With ``save_to`` the sweep's
settings go to ``<stem>.settings.json`` (:mod:`mmdit_probe.sweep_settings`) before the first run, and
the rows are rewritten atomically (temporary file, then rename) after every finished spec. A later
call with ``resume=True`` first checks that its settings are the recorded ones (model, prompts, seeds,
specs, metrics, pipeline arguments, package version; prompts and seeds may be *added*) and refuses
otherwise, reads the table back checking every row (:mod:`mmdit_probe.sweep_table`), then runs every
(prompt, seed, spec) whose rows are missing or incomplete (any metric or step absent); only the
baseline of a (prompt, seed) with unfinished specs is run again.

**Several processes** (``accelerate launch --num_processes N``; ``save_to`` required): the unfinished
(prompt, seed, spec) runs, in table order, are split into contiguous shares with
``PartialState().split_between_processes`` (a share that starts inside a (prompt, seed) runs its
baseline again: at most N − 1 extra baselines). Each rank writes its rows to its own table
``<folder>/shards/<stem>-<rank>-of-<N>.csv`` atomically after every run, marks it complete, waits for
the others' markers (:mod:`mmdit_probe.study.shards`) and merges the saved table and every shard into
the table a single process would have written (same rows, same numbers, same order); rank 0 writes it
to ``save_to``. A resume (any number of processes) counts every run complete in the saved table or in
any shard as finished, so a killed rank's finished runs are never redone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .ablate import AblateHeads, KnockOut, SkipLayers, Spec, ZeroText, check_specs
from .effect import compare, resolve_metrics, run_pipeline
from .io import atomic_write
from .maps import QUADRANTS
from .hooks import model_blocks, resolve_transformer
from .sweep_settings import (EXTENDABLE, SweepFileError, SweepSettingsError, build_settings, differences,
                             format_differences, merged, read_settings, settings_path, write_settings)
from .sweep_table import COLUMNS, peek_header, read_runs, run_key, shard_tables, table_shard

__all__ = ["sweep", "COLUMNS", "SweepFileError", "SweepSettingsError", "describe_entry", "skip_each_layer",
           "zero_text_each_layer", "knock_out_each_quadrant", "ablate_each_head", "report_text"]

ON_ERROR = ("raise", "continue")


def describe_entry(entry: Spec | Sequence[Spec]) -> str:
    """One line for a spec or a combination of specs (joined with ``" + "``)."""
    return entry.describe() if isinstance(entry, Spec) else " + ".join(s.describe() for s in entry)


def _as_specs(entry: Spec | Sequence[Spec]) -> list[Spec]:
    return [entry] if isinstance(entry, Spec) else list(entry)


def _frame(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["seed"] = df["seed"].astype("int64")
    df["spec_index"] = df["spec_index"].astype("int64")
    df["step"] = df["step"].astype("Int64")
    df["value"] = df["value"].astype("float64")
    return df


def _check_unique(values: list, what: str) -> None:
    dup = [v for i, v in enumerate(values) if v in values[:i]]
    if dup:
        raise ValueError(f"sweep: {what} given more than once: {sorted(set(map(repr, dup)))}; give each once")


def _resume(path: Path, settings: dict, resume: bool) -> tuple[dict, dict[Path, list[dict]]]:
    """The settings to record and the finished runs of ``path`` and its shards, per file (checked);
    refuses other settings."""
    spath = settings_path(path)
    shards = shard_tables(path)
    if not path.exists() and not spath.exists() and not shards:
        return settings, {}
    if not resume:
        found = next(p for p in (path, spath, *shards) if p.exists())
        raise FileExistsError(f"{found} exists; pass resume=True to continue it, or another save_to")
    if not spath.exists():
        if path.exists():
            peek_header(path)  # "not a sweep table" before "no settings"
        raise SweepFileError(f"{path if path.exists() else shards[0]} has no settings file {spath.name} next to it "
                             f"(written by an older mmdit_probe, or moved without it): what it was made with cannot "
                             f"be checked, so it is not resumed; pass another save_to to start a new sweep")
    recorded = read_settings(spath)
    diffs = differences(recorded, settings)
    if diffs:
        raise SweepSettingsError(
            f"{path} was made with other settings ({format_differences(diffs)}): resume it with the recorded settings "
            f"({' and '.join(EXTENDABLE)} may only be added), or pass another save_to to start a new sweep", diffs)
    files = [p for p in (path, *shards) if p.exists()]
    return merged(recorded, settings), read_runs(files, recorded)


def _ordered(rows: list[dict], prompts: list[str], seeds: list[int]) -> list[dict]:
    p, s = {v: i for i, v in enumerate(prompts)}, {v: i for i, v in enumerate(seeds)}
    return sorted(rows, key=lambda r: (p[r["prompt"]], s[r["seed"]], r["spec_index"]))


def _save(path: Path, rows: list[dict], order: tuple[list, list]) -> None:
    df = _frame(_ordered(rows, *order))
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _calls(rows: list[dict], recorded: dict) -> int | None:
    """Transformer calls per run: 1 + the last step of the per-step metrics (None without them)."""
    velocity = {m["name"] for m in recorded["metrics"] if m["on"] == "velocity"}
    steps = [r["step"] for r in rows if r["metric"] in velocity and r["step"] is not None]
    return max(steps) + 1 if steps else None


def report_text(report: Mapping[str, Any]) -> str:
    """The final summary of a sweep (``df.attrs["sweep_report"]``): runs done now, skipped, failed."""
    r = report
    lines = [f"sweep: {r['total']} runs ({r['prompts']} prompts x {r['seeds']} seeds x {r['specs']} specs): "
             f"{r['ran']} run now, {r['skipped']} skipped (finished before), {r['failed']} failed"]
    lines += [f"  failed: prompt {p!r}, seed {s}, spec_index {i}: {msg}" for p, s, i, msg in r["failures"][:5]]
    if r["failed"] > 5:
        lines.append(f"  ... and {r['failed'] - 5} more failures (df.attrs['sweep_report']['failures'])")
    return "\n".join(lines)


def sweep(pipe: Any, prompts: str | Sequence[str], specs: Sequence[Spec | Sequence[Spec]], seeds: Iterable[int] = (0,),
          metrics: Any = None, save_to: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
          settings: Mapping[str, Any] | None = None, on_error: str = "raise", **call_kwargs: Any):
    """Effects of each spec (or list of specs applied together) for every prompt and seed.

    ``metrics`` as in :func:`mmdit_probe.effect.resolve_metrics` (default: MSE, PSNR, cosine on latents,
    images and per-step velocity). ``call_kwargs`` go to the pipeline (not ``generator``: ``seeds``
    pick it). ``settings``: your own JSON-able values recorded with ``save_to`` and required to match on
    resume (the CLI records its ``--model`` and ``--kind``). ``on_error="continue"`` records a failed run
    and goes on (it is run again on resume); ``"raise"`` (default) stops. ``progress``: a tqdm bar per
    process and a final summary line (rank 0, stderr). Under ``accelerate launch`` the runs are split
    over the processes (see the module docstring; ``save_to`` required).

    Returns the long-form DataFrame of every row, including rows resumed from ``save_to``, ordered by
    prompt, seed, spec_index (on every rank: the merged table); ``df.attrs["sweep_report"]`` holds
    ``total, ran, skipped, failed`` run counts and ``failures`` (``[prompt, seed, spec_index, error]``).
    Raises :class:`SweepSettingsError` when ``save_to`` was made with other settings,
    :class:`SweepFileError` (naming the file and line) when it cannot be read.
    """
    from tqdm.auto import tqdm

    from .study.shards import Ranks, mark_complete, read_marker, wait_for_shards

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [int(s) for s in seeds]
    entries = list(specs)
    if not prompts or not seeds or not entries:
        raise ValueError("sweep needs at least one prompt, one seed and one spec")
    _check_unique(prompts, "prompts")
    _check_unique(seeds, "seeds")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    metric_list = resolve_metrics(metrics)
    tr = resolve_transformer(pipe)
    for e in entries:  # every spec is checked before anything runs
        check_specs(tr, *_as_specs(e))
    names = [describe_entry(e) for e in entries]

    ranks = Ranks()
    path = Path(save_to) if save_to is not None else None
    if ranks.world > 1 and path is None:
        raise ValueError(f"this sweep runs on {ranks.world} processes: pass save_to= (a table in a folder every "
                         f"process can write; --out on the command line)")
    by_file: dict[Path, list[dict]] = {}
    recorded: dict | None = None
    if path is not None:
        recorded = build_settings(pipe, prompts, seeds, names, metric_list, call_kwargs, settings, path.name)
        recorded, by_file = _resume(path, recorded, resume)
    shard = table_shard(path, ranks.rank, ranks.world) if ranks.world > 1 else None
    session = ranks.session_id() if shard is not None else ""
    if shard is not None:
        Path(str(shard) + ".done").unlink(missing_ok=True)  # not complete for this launch yet
    ranks.barrier()  # every rank has read the folder before anything in it is written
    if path is not None and ranks.is_main:
        write_settings(settings_path(path), recorded)
    order = (recorded["prompts"], recorded["seeds"]) if recorded is not None else (prompts, seeds)
    done = {run_key(r) for rows in by_file.values() for r in rows}
    units = [(p, s, i) for p in prompts for s in seeds for i in range(len(entries))]
    todo = [u for u in units if u not in done]
    mine = ranks.split(todo)
    # the rows this process writes: everything into save_to (one process), or its own shard
    rows = [r for rs in by_file.values() for r in rs] if shard is None else list(by_file.get(shard, []))
    failures: list[list] = []
    ran = 0
    one = ranks.world == 1
    desc = "sweep" if one else f"sweep {ranks.rank + 1}/{ranks.world}"
    with tqdm(total=len(units) if one else len(mine), initial=len(units) - len(todo) if one else 0,
              disable=not progress, desc=desc, unit="run", position=ranks.rank, dynamic_ncols=True) as bar:
        base_key, baseline, base_err = None, None, None
        for unit in mine:
            prompt, seed, i = unit
            try:
                if base_key != (prompt, seed):
                    base_key, baseline, base_err = (prompt, seed), None, None
                    try:
                        baseline = run_pipeline(pipe, prompt, seed, (), **call_kwargs)
                    except Exception as err:
                        base_err = err
                        raise
                    if recorded is not None and recorded["transformer_calls"] is None:
                        recorded["transformer_calls"] = len(baseline.velocities)
                        if ranks.is_main:
                            write_settings(settings_path(path), recorded)
                if base_err is not None:
                    raise RuntimeError(f"the baseline failed: {type(base_err).__name__}: {base_err}")
                ablated = run_pipeline(pipe, prompt, seed, _as_specs(entries[i]), **call_kwargs)
                new = [{"prompt": prompt, "seed": seed, "spec": names[i], "spec_index": i, **r}
                       for r in compare(baseline, ablated, metric_list)]
            except Exception as err:
                if on_error == "raise":
                    raise
                failures.append([prompt, seed, i, f"{type(err).__name__}: {err}"])
                bar.update(1)
                continue
            rows += new
            ran += 1
            if path is not None:
                _save(shard or path, rows, order)
            bar.update(1)
    if shard is None and path is not None:
        _save(path, rows, order)  # also when nothing ran: runs resumed from shards join the table
    if shard is not None:
        _save(shard, rows, order)  # also when this rank had nothing to run: the merge reads every shard
        mark_complete(shard, session, {"ran": ran, "failures": failures})
        paths = wait_for_shards(path.parent, ranks.world, session, name=path.stem, ext="csv")
        infos = [read_marker(p)[1] for p in paths]
        ran = sum(int(info.get("ran", 0)) for info in infos)
        failures = [f for info in infos for f in info.get("failures", [])]
        files = [p for p in (path, *shard_tables(path)) if p.exists()]
        rows = [r for rs in read_runs(files, recorded, warn=False).values() for r in rs]
        if recorded["transformer_calls"] is None:
            recorded["transformer_calls"] = _calls(rows, recorded)
        if ranks.is_main:
            _save(path, rows, order)
            write_settings(settings_path(path), recorded)
    df = _frame(_ordered(rows, *order))
    df.attrs["sweep_report"] = {"total": len(units), "prompts": len(prompts), "seeds": len(seeds),
                                "specs": len(entries), "ran": ran, "skipped": len(units) - len(todo),
                                "failed": len(failures), "failures": failures}
    if progress and ranks.is_main:
        print(report_text(df.attrs["sweep_report"]), file=sys.stderr)
    return df


# ---- ready-made spec lists --------------------------------------------------------------
def _n_layers(model: Any) -> int:
    return len(model_blocks(model))


def skip_each_layer(model: Any, mode: str = "block") -> list[SkipLayers]:
    """``SkipLayers([i], mode)`` for every block ``i``."""
    return [SkipLayers([i], mode=mode) for i in range(_n_layers(model))]


def zero_text_each_layer(model: Any) -> list[ZeroText]:
    """``ZeroText(layers=[i])`` for every block ``i``."""
    return [ZeroText(layers=[i]) for i in range(_n_layers(model))]


def knock_out_each_quadrant(model: Any, quadrants: Sequence[str] = QUADRANTS) -> list[KnockOut]:
    """``KnockOut(q, layers=[i])`` for every block ``i`` and quadrant ``q`` (block-major order)."""
    return [KnockOut(q, layers=[i]) for i in range(_n_layers(model)) for q in quadrants]


def ablate_each_head(model: Any, layers: Iterable[int] | None = None) -> list[AblateHeads]:
    """``AblateHeads(layers=[i], heads=[h])`` (zero) for every head of every (selected) block."""
    tr = resolve_transformer(model)
    layers = range(len(model_blocks(tr))) if layers is None else layers
    return [AblateHeads(layers=[i], heads=[h]) for i in layers for h in range(tr.config.num_attention_heads)]

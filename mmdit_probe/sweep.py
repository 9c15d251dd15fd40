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
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .ablate import AblateHeads, KnockOut, SkipLayers, Spec, ZeroText, check_specs
from .effect import compare, resolve_metrics, run_pipeline
from .io import atomic_write
from .maps import QUADRANTS
from .hooks import model_blocks, resolve_transformer
from .sweep_settings import (EXTENDABLE, SweepFileError, SweepSettingsError, build_settings, differences,
                             format_differences, merged, read_settings, settings_path, write_settings)
from .sweep_table import COLUMNS, incomplete_runs, peek_header, read_table

__all__ = ["sweep", "COLUMNS", "SweepFileError", "SweepSettingsError", "describe_entry", "skip_each_layer",
           "zero_text_each_layer", "knock_out_each_quadrant", "ablate_each_head"]


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


def _resume(path: Path, settings: dict, resume: bool) -> tuple[dict, list[dict]]:
    """The settings to record and the finished rows of ``path`` (checked); refuses other settings."""
    spath = settings_path(path)
    if not path.exists() and not spath.exists():
        return settings, []
    if not resume:
        raise FileExistsError(f"{path if path.exists() else spath} exists; pass resume=True to continue it, or "
                              f"another save_to")
    if not spath.exists():
        peek_header(path)  # "not a sweep table" before "no settings"
        raise SweepFileError(f"{path} has no settings file {spath.name} next to it (written by an older mmdit_probe, "
                             f"or moved without it): what it was made with cannot be checked, so it is not resumed; "
                             f"pass another save_to to start a new sweep")
    recorded = read_settings(spath)
    diffs = differences(recorded, settings)
    if diffs:
        raise SweepSettingsError(
            f"{path} was made with other settings ({format_differences(diffs)}): resume it with the recorded settings "
            f"({' and '.join(EXTENDABLE)} may only be added), or pass another save_to to start a new sweep", diffs)
    rows = read_table(path, recorded) if path.exists() else []
    bad = incomplete_runs(rows, recorded)
    if bad:
        listed = "; ".join(f"prompt {p!r}, seed {s}, spec_index {i}: missing {what}" for (p, s, i), what in
                           list(bad.items())[:3])
        warnings.warn(f"{path}: {len(bad)} run(s) incomplete ({listed}{'; …' if len(bad) > 3 else ''}): "
                      f"their rows are dropped and the runs done again", UserWarning, stacklevel=3)
        rows = [r for r in rows if (r["prompt"], r["seed"], r["spec_index"]) not in bad]
    return merged(recorded, settings), rows


def _ordered(rows: list[dict], prompts: list[str], seeds: list[int]) -> list[dict]:
    p, s = {v: i for i, v in enumerate(prompts)}, {v: i for i, v in enumerate(seeds)}
    return sorted(rows, key=lambda r: (p[r["prompt"]], s[r["seed"]], r["spec_index"]))


def sweep(pipe: Any, prompts: str | Sequence[str], specs: Sequence[Spec | Sequence[Spec]], seeds: Iterable[int] = (0,),
          metrics: Any = None, save_to: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
          settings: Mapping[str, Any] | None = None, **call_kwargs: Any):
    """Effects of each spec (or list of specs applied together) for every prompt and seed.

    ``metrics`` as in :func:`mmdit_probe.effect.resolve_metrics` (default: MSE, PSNR, cosine on latents,
    images and per-step velocity). ``call_kwargs`` go to the pipeline (not ``generator``: ``seeds``
    pick it). ``settings``: your own JSON-able values recorded with ``save_to`` and required to match on
    resume (the CLI records its ``--model`` and ``--kind``). Returns the long-form DataFrame of every row,
    including rows resumed from ``save_to``, ordered by prompt, seed, spec_index. Raises
    :class:`SweepSettingsError` when ``save_to`` was made with other settings, :class:`SweepFileError`
    (naming the file and line) when it cannot be read.
    """
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [int(s) for s in seeds]
    entries = list(specs)
    if not prompts or not seeds or not entries:
        raise ValueError("sweep needs at least one prompt, one seed and one spec")
    _check_unique(prompts, "prompts")
    _check_unique(seeds, "seeds")
    metric_list = resolve_metrics(metrics)
    tr = resolve_transformer(pipe)
    for e in entries:  # every spec is checked before anything runs
        check_specs(tr, *_as_specs(e))
    names = [describe_entry(e) for e in entries]

    path = Path(save_to) if save_to is not None else None
    rows: list[dict] = []
    recorded: dict | None = None
    if path is not None:
        recorded = build_settings(pipe, prompts, seeds, names, metric_list, call_kwargs, settings, path.name)
        recorded, rows = _resume(path, recorded, resume)
        write_settings(settings_path(path), recorded)
    order = (recorded["prompts"], recorded["seeds"]) if recorded is not None else (prompts, seeds)
    done = {(r["prompt"], r["seed"], r["spec_index"]) for r in rows}

    total = len(prompts) * len(seeds) * len(entries)
    finished = sum((p, s, i) in done for p in prompts for s in seeds for i in range(len(entries)))
    with tqdm(total=total, initial=finished, disable=not progress, desc="sweep", unit="run") as bar:
        for prompt in prompts:
            for seed in seeds:
                todo = [i for i in range(len(entries)) if (prompt, seed, i) not in done]
                if not todo:
                    continue
                baseline = run_pipeline(pipe, prompt, seed, (), **call_kwargs)
                if recorded is not None and recorded["transformer_calls"] is None:
                    recorded["transformer_calls"] = len(baseline.velocities)
                    write_settings(settings_path(path), recorded)
                for i in todo:
                    ablated = run_pipeline(pipe, prompt, seed, _as_specs(entries[i]), **call_kwargs)
                    rows += [{"prompt": prompt, "seed": seed, "spec": names[i], "spec_index": i, **r}
                             for r in compare(baseline, ablated, metric_list)]
                    if path is not None:
                        df = _frame(_ordered(rows, *order))
                        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
                    bar.update(1)
    return _frame(_ordered(rows, *order))


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

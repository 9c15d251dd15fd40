"""``sweep``: run many ablations over prompts and seeds and collect their effects in one long table.

>>> df = mp.sweep(pipe, ["a red circle"], mp.skip_each_layer(pipe), seeds=[0, 1],
...               save_to="skip.csv", num_inference_steps=28)
>>> df.query("metric == 'image_psnr'").pivot_table(index="spec_index", columns="seed", values="value")

Columns: ``prompt, seed, spec, spec_index, metric, step, value`` (``step`` is ``<NA>`` for
final-output metrics). The baseline runs once per (prompt, seed). With ``save_to`` the rows are
rewritten atomically (temporary file, then rename) after every finished spec, and a later call
with ``resume=True`` skips every (prompt, seed, spec) already in the file; only the baseline of a
(prompt, seed) with unfinished specs is run again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .ablate import AblateHeads, KnockOut, SkipLayers, Spec, ZeroText, check_specs
from .effect import compare, resolve_metrics, run_pipeline
from .io import atomic_write
from .maps import QUADRANTS
from .hooks import model_blocks, resolve_transformer

COLUMNS = ["prompt", "seed", "spec", "spec_index", "metric", "step", "value"]


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


def _load(path: Path) -> list[dict]:
    import pandas as pd

    df = pd.read_csv(path, keep_default_na=False, na_values={"step": [""], "value": ["", "nan", "NaN"]})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a sweep file (missing columns {missing}); pass another save_to or resume=False after moving it")
    df = df[COLUMNS].astype({"prompt": str, "spec": str})
    return [{**r, "step": None if r["step"] != r["step"] else int(r["step"])} for r in df.to_dict("records")]


def sweep(pipe: Any, prompts: str | Sequence[str], specs: Sequence[Spec | Sequence[Spec]], seeds: Iterable[int] = (0,),
          metrics: Any = None, save_to: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
          **call_kwargs: Any):
    """Effects of each spec (or list of specs applied together) for every prompt and seed.

    ``metrics`` as in :func:`mmdit_probe.effect.resolve_metrics` (default: MSE, PSNR, cosine on latents,
    images and per-step velocity). ``call_kwargs`` go to the pipeline (not ``generator``: ``seeds``
    pick it). Returns the long-form DataFrame of every row, including rows resumed from ``save_to``.
    """
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [int(s) for s in seeds]
    entries = list(specs)
    if not prompts or not seeds or not entries:
        raise ValueError("sweep needs at least one prompt, one seed and one spec")
    metric_list = resolve_metrics(metrics)
    tr = resolve_transformer(pipe)
    for e in entries:  # every spec is checked before anything runs
        check_specs(tr, *_as_specs(e))
    names = [describe_entry(e) for e in entries]

    path = Path(save_to) if save_to is not None else None
    rows: list[dict] = []
    if path is not None and path.exists():
        if not resume:
            raise FileExistsError(f"{path} exists; pass resume=True to continue it, or another save_to")
        rows = _load(path)
    done = {(r["prompt"], int(r["seed"]), int(r["spec_index"]), r["spec"]) for r in rows}

    total = len(prompts) * len(seeds) * len(entries)
    finished = sum((p, s, i, names[i]) in done for p in prompts for s in seeds for i in range(len(entries)))
    with tqdm(total=total, initial=finished, disable=not progress, desc="sweep", unit="run") as bar:
        for prompt in prompts:
            for seed in seeds:
                todo = [i for i in range(len(entries)) if (prompt, seed, i, names[i]) not in done]
                if not todo:
                    continue
                baseline = run_pipeline(pipe, prompt, seed, (), **call_kwargs)
                for i in todo:
                    ablated = run_pipeline(pipe, prompt, seed, _as_specs(entries[i]), **call_kwargs)
                    rows += [{"prompt": prompt, "seed": seed, "spec": names[i], "spec_index": i, **r}
                             for r in compare(baseline, ablated, metric_list)]
                    if path is not None:
                        df = _frame(rows)
                        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
                    bar.update(1)
    return _frame(rows)


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

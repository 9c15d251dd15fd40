"""``mmdit-probe sweep``: an ablation sweep (one spec per layer, or per layer × quadrant) into
CSV/parquet, plus effect-by-layer, per-step effect and before/after image figures.

OUT/sweep.settings.json records what the sweep was made with (:mod:`mmdit_probe.sweep_settings`, plus
``--model``, ``--kind`` and ``--dtype``); ``--resume`` refuses other settings (``--prompt`` and ``--seeds``
may be added), first from the options given, before the model loads, then from the resolved values.
Under ``accelerate launch --num_processes N -m mmdit_probe sweep ...`` the runs are split over the
processes (each writes OUT/shards/sweep-<rank>-of-<N>.csv; see :mod:`mmdit_probe.sweep`); rank 0 merges
them into OUT/sweep.csv and draws the figures.
pandas, matplotlib and :mod:`mmdit_probe.plot` are imported inside the functions that use them (heavy).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from .. import QUADRANTS, __version__, run_pipeline
from ..effect import resolve_metrics
from ..sweep import (SweepSettingsError, knock_out_each_quadrant, report_text, skip_each_layer, sweep,
                     zero_text_each_layer)
from ..sweep_settings import differences, format_differences, metric_settings, read_settings, settings_path
from ..sweep_table import read_table, shard_tables
from .common import (CLIError, Subcommand, add_model_arguments, check_output_folder, generation_kwargs, get_pipeline,
                     int_in, parse_dtype, seed_int)

KINDS = ("skip-layers", "zero-text", "knock-out")
DEFAULT_PROMPT = "a red circle left of a blue square"


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=KINDS, default="skip-layers",
                   help="skip-layers: skip each block; zero-text: zero the text entering each block; knock-out: "
                        "remove each attention quadrant (query->key) in each block")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt (repeatable; default: {DEFAULT_PROMPT!r})")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1],
                   help="seeds (0 to 2**64-1); effects are spread over them")
    p.add_argument("--out", default="out/sweep", help="output folder (sweep.csv, figures)")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv",
                   help="table format; sweep.csv is always kept as the resumable checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep in OUT (finished runs are skipped); the settings must be those "
                        "recorded in OUT/sweep.settings.json, except that --prompt and --seeds may add more")
    p.add_argument("--on-error", choices=("raise", "continue"), default="raise",
                   help="raise: stop at the first failed run; continue: record it, go on, exit with code 1 (the "
                        "failed runs are run again by --resume)")
    p.add_argument("--metric", default="image_mse", help="final-output metric of the effect-by-layer figure")
    p.add_argument("--step-metric", default="velocity_mse", help="per-step metric of the step-effect figure")
    p.add_argument("--strip", type=int_in(0, 64), default=4,
                   help="images in the before/after strip (baseline + the most effective ablations; 0: none)")
    p.add_argument("--no-figures", action="store_true", help="write the table only (no figures, no image strip)")
    add_model_arguments(p)


def sweep_specs(kind: str, pipe: Any) -> tuple[list, Any]:
    """The spec list of ``kind`` and a function ``spec_index -> {column: value}`` naming layer/quadrant."""
    if kind == "skip-layers":
        return skip_each_layer(pipe), lambda i: {"layer": i}
    if kind == "zero-text":
        return zero_text_each_layer(pipe), lambda i: {"layer": i}
    if kind == "knock-out":
        n = len(QUADRANTS)
        return knock_out_each_quadrant(pipe), lambda i: {"layer": i // n,
                                                        "quadrant": QUADRANTS[i % n].replace("->", " → ")}
    raise CLIError(f"unknown --kind {kind!r}; use one of {', '.join(KINDS)}")


FILES = ("sweep.csv", "sweep.settings.json", "sweep.parquet", "effect_by_layer.png", "step_effects.png",
         "image_strip.png")
#: settings file key -> the option that sets it
FLAGS = {"extra.model": "--model", "extra.kind": "--kind", "extra.dtype": "--dtype", "prompts": "--prompt",
         "seeds": "--seeds", "call.num_inference_steps": "--steps", "call.guidance_scale": "--guidance",
         "call.height": "--height", "call.width": "--width", "call.max_sequence_length": "--max-sequence-length",
         "model": "model weights (fingerprint)", "mmdit_probe": "mmdit_probe version"}
CALL_OPTIONS = {"steps": "num_inference_steps", "guidance": "guidance_scale", "height": "height", "width": "width",
                "max_sequence_length": "max_sequence_length"}


def _refuse(out: Path, diffs: list) -> CLIError:
    n = 2
    while Path(f"{out}-{n}").exists():
        n += 1
    return CLIError(f"{out} holds a sweep made with other settings ({format_differences(diffs, FLAGS)}); resume it "
                    f"with the recorded settings (--prompt and --seeds may only add more), or start a new sweep "
                    f"with another --out, e.g. --out {out}-{n}")


def _extra(args: argparse.Namespace) -> dict:
    """The CLI's own settings recorded with the sweep (``--dtype`` by its canonical name: bf16 = bfloat16)."""
    dtype = parse_dtype(args.dtype)
    return {"model": args.model, "kind": args.kind, "dtype": None if dtype is None else str(dtype).split(".")[-1]}


def _check_resume(args: argparse.Namespace, out: Path, prompts: list[str]) -> None:
    """Before the model loads: an existing sweep in ``out`` needs --resume and the options it was made with."""
    csv, spath = out / "sweep.csv", settings_path(out / "sweep.csv")
    shards = shard_tables(csv)
    if not csv.exists() and not spath.exists() and not shards:
        return
    if not args.resume:
        found = next(p for p in (csv, spath, *shards) if p.exists())
        raise CLIError(f"{found} exists: pass --resume to continue that sweep, or choose another --out")
    if not spath.exists():
        raise CLIError(f"{csv if csv.exists() else shards[0]} has no {spath.name} next to it (made by an older "
                       f"mmdit_probe): what it was made with cannot be checked, so it is not resumed; start a new "
                       f"sweep with another --out")
    recorded = read_settings(spath)
    given = {"mmdit_probe": __version__, "prompts": prompts, "seeds": args.seeds, "extra": _extra(args),
             "metrics": metric_settings(resolve_metrics(None)),
             "call": {k: getattr(args, a) for a, k in CALL_OPTIONS.items() if getattr(args, a) is not None}}
    diffs = differences(recorded, given, partial=True)
    if diffs:
        raise _refuse(out, diffs)
    if csv.exists():
        with warnings.catch_warnings():  # the sweep reads it again and warns then
            warnings.simplefilter("ignore")
            read_table(csv, recorded)


def run_sweep(args: argparse.Namespace) -> int:
    from ..study.shards import Ranks

    names = {m.name: m.on for m in resolve_metrics(None)}
    for opt, name, per_step in (("--metric", args.metric, False), ("--step-metric", args.step_metric, True)):
        if name not in names or (names[name] == "velocity") != per_step:
            ok = [n for n, on in names.items() if (on == "velocity") == per_step]
            raise CLIError(f"unknown {opt} {name!r}; choose one of {', '.join(ok)}")
    if args.format == "parquet":
        _check_parquet()
    prompts = args.prompt or [DEFAULT_PROMPT]
    for what, values in (("--prompt", prompts), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            raise CLIError(f"{what}: {sorted({v for v in values if values.count(v) > 1}, key=str)} given more than "
                           f"once; give each once")
    out = check_output_folder(args.out, "--out", FILES)
    csv = out / "sweep.csv"
    _check_resume(args, out, prompts)
    ranks = Ranks()  # one process unless started by `accelerate launch`
    device = args.device or (str(ranks.device) if ranks.device is not None else None)
    pipe = get_pipeline(args.model, device=device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)  # one bar over the whole sweep (per process) instead
    call = generation_kwargs(args, prompts[0], pipe)
    for k in ("prompt", "generator"):
        call.pop(k)
    scale = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
    if None not in scale:  # the size recorded even when the model's default is used
        call.setdefault("height", scale[0] * scale[1])
        call.setdefault("width", scale[0] * scale[1])
    specs, columns = sweep_specs(args.kind, pipe)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        print(f"sweep: {len(specs)} ablations x {len(prompts)} prompt(s) x {len(args.seeds)} seed(s) "
              f"({args.kind}, {call['num_inference_steps']} steps) on {ranks.world} process(es)")
    try:
        df = sweep(pipe, prompts, specs, seeds=args.seeds, save_to=csv, resume=True, progress=not args.no_progress,
                   settings=_extra(args), on_error=args.on_error, **call)
    except SweepSettingsError as err:
        raise _refuse(out, err.differences) from None
    if not ranks.is_main:
        return 0
    report = df.attrs["sweep_report"]
    if args.no_progress:  # otherwise the sweep printed it
        print(report_text(report))
    paths = {"table": csv, "settings": settings_path(csv)}
    if args.format == "parquet":
        paths["parquet"] = out / "sweep.parquet"
        df.to_parquet(paths["parquet"], index=False)
    if not len(df):
        raise CLIError(f"every run of the sweep failed (first: {report['failures'][0][-1]}); nothing to summarise")
    plot_df = _with_columns(df, columns)
    if not args.no_figures:
        paths.update(_figures(pipe, plot_df, specs, prompts[0], args, call, out))
    _print_summary(plot_df, args.metric)
    print("wrote:")
    for k, v in paths.items():
        print(f"  {k:<16} {v}")
    return 1 if report["failed"] else 0


def _figures(pipe: Any, df: Any, specs: list, prompt: str, args: argparse.Namespace, call: dict,
             out: Path) -> dict[str, Path]:
    """Effect by layer, per-step effects and the image strip into ``out``; ``{name: path}``."""
    import matplotlib.pyplot as plt  # heavy: only when drawing

    from .. import plot  # matplotlib / seaborn: heavy

    paths = {"effect_by_layer": out / "effect_by_layer.png", "step_effects": out / "step_effects.png"}
    hue = "quadrant" if "quadrant" in df.columns else None
    figs = [plot.effect_by_layer(df, args.metric, x="layer", hue=hue, path=paths["effect_by_layer"]),
            plot.step_effect_curves(df, args.step_metric, path=paths["step_effects"])]
    if args.strip > 0:
        paths["image_strip"] = out / "image_strip.png"
        figs.append(_strip(pipe, df, specs, prompt, args, call, paths["image_strip"]))
    for f in figs:
        plt.close(f)
    return paths


def _with_columns(df: Any, columns: Any) -> Any:
    import pandas as pd  # heavy; the sweep has loaded it already

    extra = pd.DataFrame([columns(int(i)) for i in df["spec_index"]], index=df.index)
    return pd.concat([df, extra], axis=1)


def _strip(pipe: Any, df: Any, specs: list, prompt: str, args: argparse.Namespace, call: dict, path: Path) -> Any:
    """Baseline plus the ``args.strip - 1`` ablations with the largest mean ``args.metric``."""
    from .. import plot  # matplotlib / seaborn: heavy

    seed = args.seeds[0]
    final = df[(df["metric"] == args.metric) & df["step"].isna()]
    order = final.groupby("spec_index")["value"].mean().sort_values(ascending="psnr" in args.metric or "cosine" in args.metric)
    chosen = [int(i) for i in order.index[: max(args.strip - 1, 0)]]
    images = [run_pipeline(pipe, prompt, seed, (), **call).images[0]]
    titles = ["baseline"]
    for i in chosen:
        images.append(run_pipeline(pipe, prompt, seed, [specs[i]], **call).images[0])
        titles.append(specs[i].describe())
    return plot.image_strip(images, titles, path=path, title=f"{prompt!r}, seed {seed}: baseline and the "
                                                             f"ablations with the largest {args.metric}")


def _print_summary(df: Any, metric: str) -> None:
    final = df[(df["metric"] == metric) & df["step"].isna()]
    by = ["spec_index", "spec"]
    table = final.groupby(by)["value"].agg(["mean", "std"]).reset_index(level=0, drop=True)
    print(f"{metric} by ablation (mean, s.d. over seeds and prompts):")
    print(table.to_string(float_format="{:.4g}".format))


def _check_parquet() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        try:
            import fastparquet  # noqa: F401
        except ImportError:
            raise CLIError("--format parquet needs pyarrow or fastparquet (pip install pyarrow); "
                           "use --format csv") from None


COMMANDS = {
    "sweep": Subcommand(
        _sweep_args, run_sweep, "run an ablation sweep into CSV/parquet plus effect plots",
        "Run one ablation per layer (skip-layers, zero-text) or per layer and quadrant (knock-out) for every "
        "prompt and seed, compare each with the unablated run (image/latent MSE, PSNR, cosine; velocity per step) "
        "and write OUT/sweep.csv (resumable with --resume), optionally sweep.parquet, an effect-by-layer figure, "
        "per-step effect curves and a before/after image strip."),
}

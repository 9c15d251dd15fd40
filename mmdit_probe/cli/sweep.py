"""``mmdit-probe sweep``: an ablation sweep (one spec per layer, or per layer × quadrant) into
CSV/parquet, plus effect-by-layer, per-step effect and before/after image figures.

pandas, matplotlib and :mod:`mmdit_probe.plot` are imported inside the functions that use them (heavy).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import QUADRANTS, run_pipeline
from ..effect import resolve_metrics
from ..sweep import knock_out_each_quadrant, skip_each_layer, sweep, zero_text_each_layer
from .common import CLIError, Subcommand, add_model_arguments, generation_kwargs, get_pipeline

KINDS = ("skip-layers", "zero-text", "knock-out")
DEFAULT_PROMPT = "a red circle left of a blue square"


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=KINDS, default="skip-layers",
                   help="skip-layers: skip each block; zero-text: zero the text entering each block; knock-out: "
                        "remove each attention quadrant (query->key) in each block")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt (repeatable; default: {DEFAULT_PROMPT!r})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds; effects are spread over them")
    p.add_argument("--out", default="out/sweep", help="output folder (sweep.csv, figures)")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv",
                   help="table format; sweep.csv is always kept as the resumable checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep from OUT/sweep.csv (finished runs are skipped)")
    p.add_argument("--metric", default="image_mse", help="final-output metric of the effect-by-layer figure")
    p.add_argument("--step-metric", default="velocity_mse", help="per-step metric of the step-effect figure")
    p.add_argument("--strip", type=int, default=4,
                   help="images in the before/after strip (baseline + the most effective ablations; 0: none)")
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


def run_sweep(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt  # heavy: only when drawing

    from .. import plot  # matplotlib / seaborn: heavy

    names = {m.name: m.on for m in resolve_metrics(None)}
    for opt, name, per_step in (("--metric", args.metric, False), ("--step-metric", args.step_metric, True)):
        if name not in names or (names[name] == "velocity") != per_step:
            ok = [n for n, on in names.items() if (on == "velocity") == per_step]
            raise CLIError(f"unknown {opt} {name!r}; choose one of {', '.join(ok)}")
    if args.format == "parquet":
        _check_parquet()
    out = Path(args.out)
    csv = out / "sweep.csv"
    if csv.exists() and not args.resume:
        raise CLIError(f"{csv} exists: pass --resume to continue that sweep, or choose another --out")
    prompts = args.prompt or [DEFAULT_PROMPT]
    pipe = get_pipeline(args.model, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)  # one bar over the whole sweep instead
    call = generation_kwargs(args, prompts[0], pipe)
    for k in ("prompt", "generator"):
        call.pop(k)
    specs, columns = sweep_specs(args.kind, pipe)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {len(specs)} ablations x {len(prompts)} prompt(s) x {len(args.seeds)} seed(s) "
          f"({args.kind}, {call['num_inference_steps']} steps)")
    df = sweep(pipe, prompts, specs, seeds=args.seeds, save_to=csv, resume=True, progress=not args.no_progress, **call)
    paths = {"table": csv}
    if args.format == "parquet":
        paths["parquet"] = out / "sweep.parquet"
        df.to_parquet(paths["parquet"], index=False)
    plot_df = _with_columns(df, columns)
    hue = "quadrant" if "quadrant" in plot_df.columns else None
    figs = []
    paths["effect_by_layer"] = out / "effect_by_layer.png"
    figs.append(plot.effect_by_layer(plot_df, args.metric, x="layer", hue=hue, path=paths["effect_by_layer"]))
    paths["step_effects"] = out / "step_effects.png"
    figs.append(plot.step_effect_curves(plot_df, args.step_metric, path=paths["step_effects"]))
    if args.strip > 0:
        paths["image_strip"] = out / "image_strip.png"
        figs.append(_strip(pipe, plot_df, specs, prompts[0], args, call, paths["image_strip"]))
    for f in figs:
        plt.close(f)
    _print_summary(plot_df, args.metric)
    print("wrote:")
    for k, v in paths.items():
        print(f"  {k:<16} {v}")
    return 0


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

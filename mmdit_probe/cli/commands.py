"""Built-in subcommands ``demo``, ``record``, ``plot`` and ``show``.

pandas, matplotlib and :mod:`mmdit_probe.plot` are imported inside the functions that draw or print
tables (heavy, and not needed for ``--help``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image

from .. import AttentionRecorder, AttentionResult, MapSelection
from ..describe_table import call_default
from .common import (CLIError, Subcommand, add_model_arguments, check_map_steps, check_output_file, check_output_folder,
                     generation_kwargs, get_pipeline, open_image, parse_int_list, set_progress, warn,
                     warn_if_not_finite)

DEMO_PROMPT = "a red circle left of a blue square"
DEMO_FILES = ("result.safetensors", "result_summary.csv", "result_image.png", "quadrant_map.png", "word_maps.png",
              "text_groups.png")


# --------------------------------------------------------------------------------------- recording


def parse_map_spec(text: str) -> MapSelection:
    """``QUADRANT[:LAYERS[:STEPS]]`` (e.g. ``image->text:2,3:0-3``) → ``MapSelection``."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise CLIError(f"bad --maps {text!r}; use QUADRANT:LAYERS:STEPS, e.g. 'image->text:2,3:0-3' "
                       "(LAYERS/STEPS: comma lists, ranges a-b, or 'all')")
    layers = parse_int_list(parts[1], "layer") if len(parts) > 1 else None
    steps = parse_int_list(parts[2], "step") if len(parts) > 2 else None
    return MapSelection(parts[0], layers=layers, steps=steps)


def record_run(args: argparse.Namespace, *, groups: bool, words: bool, entropy: bool = False,
               key_mass: bool = False, maps: list[MapSelection] | None = None
               ) -> tuple[AttentionResult, Image.Image]:
    """Load the model, run it once under an ``AttentionRecorder``; returns ``(result, image)``."""
    pipe = get_pipeline(args.model, device=args.device, dtype=args.dtype)
    set_progress(pipe, args)
    kw = generation_kwargs(args, args.prompt, pipe)
    run = {name: kw.get(name, call_default(pipe, name)) for name in ("num_inference_steps", "guidance_scale",
                                                                       "max_sequence_length")}
    check_map_steps(maps or [], getattr(args, "maps", []), run["num_inference_steps"])
    with AttentionRecorder(pipe, groups=groups, words=words, entropy=entropy, key_mass=key_mass,
                           maps=maps or None) as rec:
        image = pipe(**kw).images[0]
    res = rec.result
    res.meta["run"] = {"prompt": args.prompt, "model": args.model, "steps": run["num_inference_steps"],
                       "seed": args.seed, "guidance": run["guidance_scale"], "max_sequence_length": run["max_sequence_length"],
                       "height": image.size[1], "width": image.size[0]}
    warn_if_not_finite(args, res)
    return res, image


def summary_table(res: AttentionResult):
    """Quadrant table (layer rows; ``image->image`` … columns) of the cond branch (or all rows)."""
    branch = "cond" if "cond" in res.branches else None
    return res.quadrant_table(by=("layer",), branch=branch)


def output_paths(results_path: Path) -> dict[str, Path]:
    """The results file and the summary CSV and image written next to it."""
    stem = results_path.with_suffix("")
    return {"results": results_path, "summary": Path(f"{stem}_summary.csv"), "image": Path(f"{stem}_image.png")}


def _write_outputs(res: AttentionResult, image: Image.Image, results_path: Path) -> dict[str, Path]:
    paths = output_paths(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    res.meta.setdefault("run", {})["image"] = paths["image"].name
    res.save(results_path)
    summary_table(res).to_csv(paths["summary"])
    image.save(paths["image"])
    return paths


def _print_table(res: AttentionResult) -> None:
    import pandas as pd  # heavy; only for printing

    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print("Mean attention mass per quadrant (query->key), cond branch, by layer:")
        print(summary_table(res).to_string())


# ------------------------------------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="prompt to generate and analyse")
    add_model_arguments(p)


def run_demo(args: argparse.Namespace) -> int:
    from .. import plot  # matplotlib / seaborn: heavy

    out = check_output_folder(args.out, "--out", DEMO_FILES)
    res, image = record_run(args, groups=True, words=True)
    paths = _write_outputs(res, image, out / "result.safetensors")
    paths.update({name: out / f"{name}.png" for name in ("quadrant_map", "word_maps", "text_groups")})
    figs = [plot.quadrant_map(res, path=paths["quadrant_map"]),
            plot.word_maps(res, image=image, path=paths["word_maps"]),
            plot.text_group_breakdown(res, path=paths["text_groups"])]
    _close(figs)
    _print_table(res)
    _print_paths(paths)
    return 0


# ----------------------------------------------------------------------------------------- record


def _record_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt to generate")
    p.add_argument("-o", "--out", default="out/record/result.safetensors",
                   help="results file (.safetensors); the summary CSV (<stem>_summary.csv) and the generated image "
                        "(<stem>_image.png) are written next to it")
    s = p.add_argument_group("statistics (quadrant masses are always recorded)")
    s.add_argument("--groups", action="store_true", help="mass per key group (image, CLIP/T5 real/special/padding)")
    s.add_argument("--words", action="store_true", help="image→word maps for every prompt word")
    s.add_argument("--entropy", action="store_true", help="attention entropy per query group")
    s.add_argument("--key-mass", action="store_true", help="attention each key token receives (sinks)")
    s.add_argument("--maps", action="append", default=[], metavar="QUADRANT:LAYERS:STEPS",
                   help="keep exact softmax maps, e.g. 'image->text:2,3:0-3' or 'text->image:all:0' (repeatable; "
                        "quote it: > is a shell redirect)")
    add_model_arguments(p)


def run_record(args: argparse.Namespace) -> int:
    maps = [parse_map_spec(m) for m in args.maps]
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out must end in .safetensors, got {args.out!r}")
    for path in output_paths(out).values():  # all before the model loads and the run
        check_output_file(path, "--out")
    if args.steps is not None:
        check_map_steps(maps, args.maps, args.steps)
    res, image = record_run(args, groups=args.groups, words=args.words, entropy=args.entropy,
                            key_mass=args.key_mass, maps=maps)
    paths = _write_outputs(res, image, out)
    _print_table(res)
    _print_paths(paths)
    return 0


# ------------------------------------------------------------------------------------------- plot


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results file written by `mmdit-probe record` / result.save()")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: next to the results file)")
    p.add_argument("--branch", default="cond", help="CFG branch: cond, uncond or all")
    p.add_argument("--quadrant", default="image->text", help="quadrant of the per-head grid (query->key)")
    p.add_argument("--steps", default="all", help="steps averaged in the per-head grid and word maps, e.g. 0-3")
    p.add_argument("--layers", default="all", help="layers averaged in the word maps, e.g. 1,2")
    p.add_argument("--words", nargs="+", default=None, help="words for the word maps (default: all recorded)")
    p.add_argument("--image", default=None, help="image to overlay word maps on (default: the recorded one)")


def run_plot(args: argparse.Namespace) -> int:
    from .. import plot  # matplotlib / seaborn: heavy

    path = Path(args.results)
    stem = path.with_suffix("").name
    quad = args.quadrant.replace("->", "-").replace(">", "")
    names = [f"{stem}_{n}.png" for n in ("quadrant_map", f"heads_{quad}", "text_groups", "word_maps")]
    steps, layers = parse_int_list(args.steps, "step"), parse_int_list(args.layers, "layer")
    res = AttentionResult.load(path)
    out = check_output_folder(args.out or path.parent, "--out" if args.out else "the results file's folder", names)
    given_image = open_image(args.image) if args.image else None
    warn_if_not_finite(args, res)
    branch = None if args.branch == "all" else args.branch
    paths: dict[str, Path] = {"quadrant_map": out / f"{stem}_quadrant_map.png"}
    figs = [plot.quadrant_map(res, branch=branch, path=paths["quadrant_map"])]
    paths["head_grid"] = out / f"{stem}_heads_{quad}.png"
    figs.append(plot.head_grid(res, args.quadrant, steps=steps, branch=branch, path=paths["head_grid"]))
    if "group_mass" in res.stats:
        paths["text_groups"] = out / f"{stem}_text_groups.png"
        figs.append(plot.text_group_breakdown(res, branch=branch, steps=steps, path=paths["text_groups"]))
    else:
        print("note: no group masses recorded (record with --groups) - text-group figure skipped")
    if "word_map" in res.stats:
        image = given_image if given_image is not None else _recorded_image(args, res, path)
        paths["word_maps"] = out / f"{stem}_word_maps.png"
        figs.append(plot.word_maps(res, words=args.words, image=image, layers=layers, steps=steps, branch=branch,
                                   path=paths["word_maps"]))
    else:
        print("note: no word maps recorded (record with --words) - word heatmaps skipped")
    _close(figs)
    _print_paths(paths)
    return 0


def _recorded_image(args: argparse.Namespace, res: AttentionResult, results_path: Path) -> Image.Image | None:
    """The image recorded next to the results file, if it is there and readable (else a warning)."""
    name = res.meta.get("run", {}).get("image")
    candidate = results_path.parent / name if name else None
    if candidate is None or not candidate.is_file():
        return None
    try:
        return open_image(candidate, "recorded image")
    except CLIError as err:
        warn(args, f"{err}; word maps drawn without it")
        return None


# ------------------------------------------------------------------------------------------- show


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results file (.safetensors)")


def run_show(args: argparse.Namespace) -> int:
    res = AttentionResult.load(args.results)
    print(format_result(res, args.results))
    warn_if_not_finite(args, res)
    return 0


def format_result(res: AttentionResult, name: str = "") -> str:
    """Human-readable summary: run, model, statistics with dims, coordinates, layouts, quadrant table."""
    import pandas as pd  # heavy; only for printing

    lines = [f"results file: {name}" if name else "result"]
    run = res.meta.get("run")
    if run:
        lines.append("run: " + ", ".join(f"{k}={v!r}" for k, v in run.items()))
    m = res.meta
    lines.append(f"model: {m.get('model')}, {m.get('num_layers')} layers, {m.get('heads')} heads of {m.get('head_dim')}, "
                 f"qk_norm={m.get('qk_norm')}, dual attention layers={m.get('dual_attention_layers')}, "
                 f"dtype={m.get('dtype')}")
    lines.append(f"image grid: {res.image_grid}, text tokens: {m.get('n_text')}, joint order: {m.get('order')}")
    lines.append("statistics:")
    for n, st in res.stats.items():
        dims = ", ".join(f"{d}={k}" for d, k in st.shape.items())
        lines.append(f"  {n:<11} [{dims}]")
    lines.append("coordinates:")
    mass = res.mass
    ts = ", ".join(f"{t:.1f}" for t in res.timesteps)
    lines.append(f"  step: {list(mass.labels('step'))} (timesteps {ts})")
    lines.append(f"  layer: {list(mass.labels('layer'))}; attention: {list(mass.labels('attention'))}")
    lines.append(f"  batch: {list(mass.labels('batch'))} (branches {list(res.branches)}); heads: {len(mass.labels('head'))}")
    if res.words:
        lines.append(f"  words: {', '.join(res.words)}")
    lines.append(f"full maps: {len(res.maps)}" + (f" (first keys {sorted(res.maps)[:4]})" if res.maps else ""))
    lines.append("token layout per batch row:")
    for i, lay in enumerate(res.layouts):
        branch = res.branches[i] if i < len(res.branches) else "?"
        desc = "(none)" if lay is None else f"{lay.describe()}; prompt {lay.prompt!r}"
        lines.append(f"  row {i} [{branch}]: {desc}")
    if mass.values.numel() and "cond" in res.branches:
        with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
            lines.append("mean attention mass per quadrant (query->key), cond branch, by layer:")
            lines.append(res.quadrant_table().to_string())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ utils


def _close(figs: list[Any]) -> None:
    import matplotlib.pyplot as plt  # heavy; loaded by plot already

    for f in figs:
        plt.close(f)


def _print_paths(paths: dict[str, Path]) -> None:
    print("wrote:")
    for k, v in paths.items():
        print(f"  {k:<13} {v}")


COMMANDS = {
    "demo": Subcommand(_demo_args, run_demo, "record the demo prompt on the default model and write table + figures",
                       "Record one run (quadrant masses, key groups, word maps) on the embedded default model and "
                       "write result.safetensors, a quadrant summary CSV (also printed), the image, a quadrant-map "
                       "figure, word heatmaps and a text-group breakdown into --out."),
    "record": Subcommand(_record_args, run_record, "record a run into a results file plus a summary CSV",
                         "Generate PROMPT with the chosen model while recording attention statistics; write the "
                         "results file (.safetensors), a quadrant summary CSV and the generated image."),
    "plot": Subcommand(_plot_args, run_plot, "draw the figures of a results file",
                       "Draw the quadrant map, a per-head grid, the text-group breakdown (if recorded with --groups) "
                       "and word heatmaps (if recorded with --words) of a results file as PNGs."),
    "show": Subcommand(_show_args, run_show, "print a results file's contents",
                       "Print a results file's run, model, statistics and dims, coordinates, token layouts and the "
                       "quadrant table."),
}
from .analyse import COMMANDS as _ANALYSE; COMMANDS.update(_ANALYSE)  # noqa: E402,E702  mmdit-probe analyse (issue 16)

"""``mmdit-probe analyse IMAGE``: attention of a model on a real image noised to levels σ
(:func:`mmdit_probe.analyse.analyse_image`), written as a results file, a summary CSV and word-map figure.

Every input (image file, σ values, output folder, device, options) is checked before the model loads; the
image size is checked against the model (a multiple of its VAE × patch size) right after it loads, before
anything computes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import (DTYPES, MAX_SIZE, MAX_T5, CLIError, Subcommand, check_device, check_output_folder,
                     finite_float, get_pipeline, int_in, open_image, parse_int_list, seed_int)

FILES = ("analysis.safetensors", "analysis_summary.csv", "analysis_image.png", "word_maps.png", "concept_maps.npz",
         "concept_maps.png")


def sigma_value(text: str) -> float:
    """argparse type: a noise level in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"a noise level sigma is in [0, 1] (0 = the clean image, 1 = pure noise), "
                                         f"got {text!r}")
    return v


def add_analyse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the image to analyse (PNG, JPEG, ...; RGB)")
    p.add_argument("--prompt", required=True, help="the prompt the model reads with the image (its words get maps)")
    p.add_argument("--sigmas", type=sigma_value, nargs="+", default=[0.3, 0.6], metavar="SIGMA",
                   help="noise levels in [0, 1]; one transformer call each (step i of the results = the i-th sigma)")
    p.add_argument("--out", default="out/analyse", help="output folder (results file, summary CSV, image, figure)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise (one draw shared by every sigma)")
    p.add_argument("--negative-prompt", default=None, help="text of the uncond rows when CFG is on (SD3; default '')")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="CFG scale (SD3: > 1 adds the uncond rows; Flux: its guidance embedding); default: the "
                        "model's (5 for the embedded shapes model)")
    s = p.add_argument_group("statistics (quadrant masses and word maps are always recorded)")
    s.add_argument("--groups", action="store_true", help="mass per key group (image, CLIP/T5 real/special/padding)")
    s.add_argument("--entropy", action="store_true", help="attention entropy per query group")
    s.add_argument("--key-mass", action="store_true", help="attention each key token receives (sinks)")
    s.add_argument("--concepts", nargs="+", default=None, metavar="WORD",
                   help="concept maps for these words too (they need not be in the prompt): raw concept→image "
                        "attention and output-space maps, written to concept_maps.npz and concept_maps.png")
    s.add_argument("--layers", default="all", help="layers averaged in the figures, e.g. 0 or 1-3")
    s.add_argument("--no-figure", action="store_true", help="skip the word-map figure")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="'default' (the embedded trained shapes model), 'shapes', 'tiny' / 'tiny-sd3', 'tiny-sd35', "
                        "a Hugging Face id or a local diffusers folder (SD3 / SD3.5 / Flux.1)")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), metavar="DTYPE",
                   help="float32, bfloat16 or float16 (default: the model's own)")
    size = int_in(1, MAX_SIZE)
    g.add_argument("--height", type=size, default=None, help="resize the image to this height (default: its own)")
    g.add_argument("--width", type=size, default=None, help="resize the image to this width (default: its own)")
    g.add_argument("--max-sequence-length", type=int_in(1, MAX_T5), default=None, metavar="N",
                   help="T5 tokens (default: the model's: 12 for the shapes model)")


def run_analyse(args: argparse.Namespace) -> int:
    layers = parse_int_list(args.layers, "layer")
    out = check_output_folder(args.out, "--out", FILES)
    check_device(args.device)
    image = open_image(args.image, "IMAGE").convert("RGB")
    if not args.prompt.strip():
        raise CLIError("--prompt is empty; give the text the model should read with the image")
    pipe = get_pipeline(args.model, device=args.device, dtype=args.dtype)
    from ..analyse import analyse_image  # after the checks: the library and diffusers are loaded now

    n_layers = len(pipe.transformer.transformer_blocks) + len(getattr(pipe.transformer, "single_transformer_blocks", ()))
    bad = [l for l in layers or () if l >= n_layers]
    if bad:
        raise CLIError(f"--layers {args.layers!r}: this model has layers 0-{n_layers - 1}")
    res = analyse_image(pipe, image, args.prompt, args.sigmas, seed=args.seed, negative_prompt=args.negative_prompt,
                        guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length,
                        height=args.height, width=args.width, words=True, groups=args.groups, entropy=args.entropy,
                        key_mass=args.key_mass, concepts=args.concepts)  # guidance / T5 length: the model's own
    settings = res.meta["analysis"]
    shown = image.resize((settings["width"], settings["height"])) if image.size != (settings["width"], settings["height"]) else image
    res.meta["run"] = {"prompt": args.prompt, "model": args.model, "sigmas": list(args.sigmas), "seed": args.seed,
                       "guidance": settings["guidance_scale"], "max_sequence_length": settings["max_sequence_length"],
                       "height": settings["height"], "width": settings["width"], "image": FILES[2],
                       "source": Path(args.image).name}
    paths = {"results": out / FILES[0], "summary": out / FILES[1], "image": out / FILES[2]}
    out.mkdir(parents=True, exist_ok=True)
    res.save(paths["results"])
    table = summary(res)
    table.to_csv(paths["summary"])
    shown.save(paths["image"])
    if not args.no_figure and res.words:
        from .. import plot  # matplotlib: heavy
        import matplotlib.pyplot as plt

        paths["word_maps"] = out / FILES[3]
        plt.close(plot.word_maps(res, image=shown, layers=layers, by="step", path=paths["word_maps"]))
    if res.concepts is not None:
        paths["concepts"] = out / FILES[4]
        save_concepts(res, paths["concepts"])
        if not args.no_figure:
            paths["concept_maps"] = out / FILES[5]
            concept_figure(res, shown, layers, paths["concept_maps"])
    import pandas as pd

    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print(f"Mean attention mass per quadrant (query->key), {'cond' if 'cond' in res.branches else 'all'} rows, "
              f"by step (sigma) and layer:")
        print(table.to_string())
    print("wrote:")
    for k, v in paths.items():
        print(f"  {k:<10} {v}")
    return 0


def save_concepts(res, path: Path) -> None:
    """The concept maps as ``.npz`` (no pickle): raw, image_mass, scores, output_space, concepts, sigmas, layers, branches."""
    import numpy as np

    cm = res.concepts
    arrays = {n: getattr(cm, n).numpy() for n in ("raw", "image_mass", "scores", "output_space")}
    np.savez(path, **arrays, concepts=np.array(cm.concepts), sigmas=np.array(res.sigmas),
             layers=np.array(cm.layers), branches=np.array(cm.branches))


def concept_figure(res, image, layers, path: Path) -> None:
    """Rows: sigma × (raw attention, output space); columns: concepts; maps of the cond row, mean over ``layers``."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    cm = res.concepts
    kinds = (("raw", cm.raw_map), ("output space", cm.output_map))
    n_r, n_c = 2 * len(res.sigmas), len(cm.concepts)
    fig, axs = plt.subplots(n_r, n_c, figsize=(1.9 * n_c + 0.6, 1.9 * n_r + 0.6), squeeze=False, constrained_layout=True)
    size = (image.size[1], image.size[0])
    for i, sigma in enumerate(res.sigmas):
        for k, (name, fn) in enumerate(kinds):
            for c, concept in enumerate(cm.concepts):
                ax = axs[2 * i + k, c]
                grid = fn(concept, step=i, layer=layers)[None, None]
                up = torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
                ax.imshow(np.asarray(image))
                ax.imshow(up.numpy(), cmap="magma", alpha=0.6)
                ax.set_xticks([])
                ax.set_yticks([])
                if 2 * i + k == 0:
                    ax.set_title(f"“{concept}”", fontsize=9)
                if c == 0:
                    ax.set_ylabel(f"σ={sigma:g}\n{name}", fontsize=8)
    fig.suptitle("Concept maps (cond row, " + ("all layers" if layers is None else f"layers {layers}") + ")", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(res):
    """Quadrant table with rows ``(step, sigma, layer)`` of the cond rows (``attn``)."""
    df = res.to_dataframe("mass")
    df = df[(df["branch"] == "cond") & (df["attention"] == "attn")] if "cond" in res.branches else df
    df = df.assign(quadrant=df["query"] + "->" + df["key"])
    return df.pivot_table(index=["step", "sigma", "layer"], columns="quadrant", values="mass", aggfunc="mean")


COMMANDS = {
    "analyse": Subcommand(
        add_analyse_arguments, run_analyse, "attention on a real image noised to chosen sigmas",
        "Encode IMAGE with the model's VAE, noise it to each --sigmas value (x = (1-sigma)·x0 + sigma·noise, one "
        "seeded noise draw) and run the transformer once per sigma with --prompt, as the pipeline's sampler would at "
        "that noise level. Writes analysis.safetensors (steps = sigmas, with a sigma coordinate; quadrant masses "
        "and word maps), a quadrant summary CSV, the image as analysed and word maps over it (rows: sigmas); with "
        "--concepts also concept maps (concept_maps.npz, concept_maps.png)."),
}

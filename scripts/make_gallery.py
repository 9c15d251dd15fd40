"""Regenerate docs/gallery/*.png from the embedded default model (offline, CPU, ~1 minute).

    OMP_NUM_THREADS=1 MPLBACKEND=Agg python scripts/make_gallery.py [--out docs/gallery]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mmdit_probe as mp  # noqa: E402
from mmdit_probe import plot  # noqa: E402
from mmdit_probe.shapes import default_pipeline, default_run_kwargs  # noqa: E402

PROMPT = "a red circle left of a blue square"
MAX_BYTES = 200_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "gallery"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pipe = default_pipeline()
    run = default_run_kwargs(pipe)
    with mp.AttentionRecorder(pipe, groups=True, words=True) as rec:
        image = pipe(PROMPT, generator=torch.manual_seed(0), **run).images[0]
    res = rec.result
    words = [w for w in ("red", "circle", "blue", "square") if w in res.words]
    figs = {
        "quadrant_map": plot.quadrant_map(res),
        "head_grid": plot.head_grid(res, "image->text"),
        "text_groups": plot.text_group_breakdown(res),
        "word_maps": plot.word_maps(res, words=words, image=image),
        "word_maps_by_layer": plot.word_maps(res, words=words[:2], image=image, by="layer"),
    }
    from mmdit_probe.effect import run_pipeline
    from mmdit_probe.maps import QUADRANTS
    from mmdit_probe.sweep import knock_out_each_quadrant, skip_each_layer, sweep

    skip = sweep(pipe, [PROMPT], skip_each_layer(pipe), seeds=args.seeds, progress=False, **run)
    figs["effect_by_layer"] = plot.effect_by_layer(skip.assign(layer=skip.spec_index), "image_mse", x="layer")
    figs["step_effects"] = plot.step_effect_curves(skip, "velocity_mse")
    ko = sweep(pipe, [PROMPT], knock_out_each_quadrant(pipe), seeds=args.seeds, progress=False, **run)
    ko = ko.assign(layer=ko.spec_index // 4, quadrant=ko.spec_index.map(lambda i: QUADRANTS[i % 4].replace("->", " → ")))
    figs["knock_out"] = plot.effect_by_layer(ko, "image_mse", x="layer", hue="quadrant")
    specs = skip_each_layer(pipe)
    imgs = [run_pipeline(pipe, PROMPT, 0, (), **run).images[0]] + [run_pipeline(pipe, PROMPT, 0, [s], **run).images[0]
                                                                  for s in specs]
    figs["image_strip"] = plot.image_strip(imgs, ["baseline"] + [s.describe() for s in specs])
    for name, fig in figs.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        size = path.stat().st_size
        print(f"{path} {size / 1000:.0f} kB")
        if size > MAX_BYTES:
            print(f"warning: {path} is over {MAX_BYTES // 1000} kB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate docs/study.png and docs/study_difference.png: a study of the embedded default model over
shipped prompts, with bootstrap interval bands (offline, CPU; 73 s for 32 prompts on 1 thread).

    OMP_NUM_THREADS=1 MPLBACKEND=Agg python scripts/make_study_figure.py [--prompts 32] [--out docs]

Settings: ``T5`` (the model as shipped) and ``no T5`` (``without_t5(pipe)``: SD3 feeds zeros for T5), every
prompt with seed 0 (``--seeds``), the model's run kwargs (20 steps, CFG 5, T5 length 12), statistics mass
and group mass. Prompts: ``--prompts`` spread evenly over the shipped set (one- and two-object
captions, every relation). ``study.png``: quadrant mass by step (cond branch) with bands, and the image
queries' mass per key group with whiskers; ``study_difference.png``: no T5 − T5 per quadrant as a
layer × step map, a dot where the interval excludes 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mmdit_probe as mp  # noqa: E402
from mmdit_probe.study import Setting, shipped_prompts, without_t5  # noqa: E402
from mmdit_probe.study.figures import difference_map, group_bars, quadrant_lines  # noqa: E402

MAX_BYTES = 300_000
DPI = 100


def spread_prompts(n: int):
    """``n`` shipped prompts spread evenly over the set (one- and two-object captions, every relation)."""
    shipped = shipped_prompts()
    if not 2 <= n <= len(shipped):
        raise SystemExit(f"--prompts must be 2 to {len(shipped)}, got {n}")
    return shipped.iloc[np.linspace(0, len(shipped) - 1, n).round().astype(int)].reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder of study.png and study_difference.png")
    ap.add_argument("--prompts", type=int, default=32, help="number of shipped prompts")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = mp.default_pipeline()
    run = mp.default_run_kwargs(pipe)
    prompts = spread_prompts(args.prompts)
    t0 = time.perf_counter()
    res = mp.study(pipe, prompts, seeds=args.seeds, statistics=("mass", "group_mass"), n_boot=args.n_boot,
                   settings={"T5": {}, "no T5": Setting(pipe=without_t5(pipe))}, **run)
    print(f"{res.report['done']} runs in {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} threads)")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), constrained_layout=True, width_ratios=[1.35, 1])
    quadrant_lines(res, "step", setting="T5", ax=axes[0],
                   title=f"quadrant mass by step (cond branch; mean over {len(prompts)} prompts, 95% bootstrap band)")
    group_bars(res, setting="T5", ax=axes[1])
    axes[1].set_title("image queries: mass per key group (whiskers: 95% bootstrap interval)", fontsize=9)
    fig.suptitle(f"mp.study of the embedded shapes model: {len(prompts)} shipped prompts x {len(args.seeds)} "
                 f"seed(s), {run['num_inference_steps']} steps, CFG {run['guidance_scale']:g}", fontsize=10)
    paths = [out / "study.png", out / "study_difference.png"]
    fig.savefig(paths[0], dpi=DPI)
    plt.close(fig)
    fig = difference_map(res, "T5", "no T5")
    fig.savefig(paths[1], dpi=DPI)
    plt.close(fig)

    d = res.difference("T5", "no T5", by=["query", "key"], where={"branch": "cond"})
    print(d[["query", "key", "mean_a", "mean_b", "mean", "ci_low", "ci_high", "n"]].round(4).to_string(index=False))
    for p in paths:
        size = p.stat().st_size
        print(f"wrote {p} ({size / 1000:.0f} kB)")
        if size > MAX_BYTES:
            print(f"{p} is larger than {MAX_BYTES} bytes", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mmdit-probe study``: record a prompt set (× seeds × settings) and aggregate it as it streams into
tables with bootstrap intervals over prompts, plus figures with interval bands.

On several processes: ``accelerate launch --num_processes N -m mmdit_probe study ...`` (each rank runs
its share of the prompts into OUT/shards, rank 0 merges and writes the tables). pandas, matplotlib and
accelerate are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .common import (PROG, CLIError, HelpFormatter, Subcommand, add_model_arguments, get_pipeline, parse_int_list,
                     positive_int, run_kwargs)

SPEC_KINDS = ("skip-layers", "zero-text", "knock-out")
SETTING_KEYS = {
    "guidance": ("guidance_scale", float), "guidance_scale": ("guidance_scale", float),
    "max-sequence-length": ("max_sequence_length", int), "max_sequence_length": ("max_sequence_length", int),
    "slg": ("skip_guidance_layers", "layers"), "slg-scale": ("skip_layer_guidance_scale", float),
    "slg-start": ("skip_layer_guidance_start", float), "slg-stop": ("skip_layer_guidance_stop", float),
    "t5": (None, "onoff"),
}
MAX_DIFFERENCE_FIGURES = 4


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt file: .csv with a 'prompt' column or .jsonl with {\"prompt\": ...} per line; other "
                        "columns/fields are kept as prompt metadata (default: the shipped CC0 set of 302 shapes-world "
                        "captions)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every prompt runs each")
    p.add_argument("--statistics", default="mass,group_mass,word_map",
                   help="comma list of mass, group_mass, entropy, word_map")
    p.add_argument("--specs", choices=SPEC_KINDS, default=None,
                   help="settings: baseline plus one ablation per layer (skip-layers, zero-text) or per layer and "
                        "quadrant (knock-out)")
    p.add_argument("--setting", nargs="+", action="append", default=None, metavar=("NAME", "KEY=VALUE"),
                   help="a named setting (repeatable; the first is the reference of differences), e.g. "
                        "`--setting t5 --setting no-t5 t5=off --setting cfg1 guidance=1 --setting slg slg=2,3`. "
                        "Keys: guidance, t5 (on/off), max-sequence-length, slg (layers), slg-scale, slg-start, slg-stop")
    p.add_argument("--out", default="out/study", help="output folder (tables, figures, shards/, study.npz)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted study from OUT/shards (finished runs are skipped)")
    p.add_argument("--keep-runs", action="store_true", help="also keep every run's rows (OUT/runs.csv; grows with runs)")
    p.add_argument("--head-intervals", action="store_true",
                   help="keep per-prompt means per head, so intervals can be per head (memory x heads)")
    p.add_argument("--level", type=float, default=0.95, help="bootstrap interval level")
    p.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap replicates")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between shard writes (0: after every run)")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    add_model_arguments(p, generation=False)
    g = p.add_argument_group("generation")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, <= 1 disables CFG (default: the model's run kwargs, 5)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def parse_setting(tokens: Sequence[str], pipe: Any) -> tuple[str, Any]:
    """``NAME [KEY=VALUE ...]`` → ``(name, Setting)``."""
    from ..study import Setting, without_t5

    name, kv = tokens[0], tokens[1:]
    if "=" in name:
        raise CLIError(f"--setting {' '.join(tokens)}: give a name first, e.g. --setting no-t5 t5=off")
    call: dict[str, Any] = {}
    spipe = None
    for item in kv:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTING_KEYS:
            raise CLIError(f"--setting {name}: bad {item!r}; use KEY=VALUE with KEY one of "
                           f"{', '.join(k for k in SETTING_KEYS if '_' not in k)}")
        arg, kind = SETTING_KEYS[key]
        try:
            if kind == "layers":
                call[arg] = parse_int_list(value, "layer") or []
            elif kind == "onoff":
                if value.lower() not in ("on", "off"):
                    raise ValueError
                spipe = without_t5(pipe) if value.lower() == "off" else None
            else:
                call[arg] = kind(value)
        except ValueError:
            raise CLIError(f"--setting {name}: bad value in {item!r}") from None
    return name, Setting(name, (), call, spipe)


def _spec_list(kind: str, pipe: Any) -> list:
    from .. import knock_out_each_quadrant, skip_each_layer, zero_text_each_layer

    return {"skip-layers": skip_each_layer, "zero-text": zero_text_each_layer,
            "knock-out": knock_out_each_quadrant}[kind](pipe)


def run_study(args: argparse.Namespace) -> int:
    from ..study import load_prompts, shipped_prompts, study
    from ..study.shards import Ranks

    stats = [s.strip() for s in args.statistics.split(",") if s.strip()]
    if not 0 < args.level < 1:
        raise CLIError(f"--level must be between 0 and 1, got {args.level}")
    if args.specs and args.setting:
        raise CLIError("give --specs or --setting, not both")
    out = Path(args.out)
    prompts = load_prompts(args.prompts, limit=args.limit) if args.prompts else shipped_prompts()
    if args.limit and not args.prompts:
        prompts = prompts.head(args.limit)
    ranks = Ranks()
    device = args.device or (str(ranks.device) if ranks.device is not None else None)
    pipe = get_pipeline(args.model, device=device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)  # one bar per rank over the whole study instead
    call = run_kwargs(args, pipe)
    if args.height:
        call["height"] = args.height
    if args.width:
        call["width"] = args.width
    specs = _spec_list(args.specs, pipe) if args.specs else None
    settings = dict(parse_setting(t, pipe) for t in args.setting) if args.setting else None
    if settings is not None and len(settings) != len(args.setting):
        raise CLIError("--setting names must be distinct")
    if ranks.is_main:
        n_set = 1 + len(specs) if specs else len(settings or [None])
        print(f"study: {len(prompts)} prompts x {len(args.seeds)} seed(s) x {n_set} setting(s) on {ranks.world} "
              f"process(es); {call['num_inference_steps']} steps -> {out}", file=sys.stderr)
    res = study(pipe, prompts, seeds=args.seeds, statistics=stats, specs=specs, settings=settings, out=out,
                resume=args.resume, keep_runs=args.keep_runs, head_intervals=args.head_intervals, level=args.level,
                n_boot=args.n_boot, bootstrap_seed=args.bootstrap_seed, progress=not args.no_progress,
                checkpoint_every=args.checkpoint_every, **call)
    if not ranks.is_main:
        return 0
    paths = write_outputs(res, out, figures=not args.no_figures)
    print("wrote:")
    for v in paths.values():
        print(f"  {v}")
    if args.no_progress:
        print(res.report_text())
    return 1 if res.report["failed"] else 0


def write_outputs(res: Any, out: Path, figures: bool = True) -> dict[str, Path]:
    """Tables (CSV) and figures of a study into ``out``; returns ``{file name: path}``."""
    from ..io import atomic_write

    paths: dict[str, Path] = {"study.npz": out / "study.npz"}

    def table(name: str, df: Any) -> None:
        if df is not None and len(df):
            paths[f"{name}.csv"] = out / f"{name}.csv"
            atomic_write(paths[f"{name}.csv"], lambda tmp: df.to_csv(tmp, index=False))

    table("summary", res.summary())
    table("moments", res.moments())
    if len(res.settings) > 1:
        import pandas as pd

        table("differences", pd.concat([res.difference(res.settings[0], b) for b in res.settings[1:]],
                                       ignore_index=True))
    if "word_map" in res.statistics and res.words:
        table("word_maps", res.word_maps(branch=None))
    if res.runs is not None:
        table("runs", res.runs)
    if not figures or not res.state.done:
        return paths
    import matplotlib.pyplot as plt

    drawn = []
    if "mass" in res.statistics:
        drawn += [("quadrants_by_layer", lambda: res.plot_quadrants("layer", setting=res.settings[:4])),
                  ("quadrants_by_step", lambda: res.plot_quadrants("step", setting=res.settings[:4]))]
        for i, b in enumerate(res.settings[1:1 + MAX_DIFFERENCE_FIGURES], 1):
            drawn.append((f"difference_{i}", lambda b=b: res.plot_difference(res.settings[0], b)))
    if "group_mass" in res.statistics:
        drawn.append(("key_groups", lambda: res.plot_groups()))
    if "word_map" in res.statistics and res.words:
        drawn.append(("word_maps", lambda: res.plot_word_maps()))
    for name, draw in drawn:
        try:
            fig = draw()
        except (KeyError, ValueError) as err:  # e.g. no cond branch without CFG: skip that figure
            print(f"{PROG} study: no {name} figure: {err}", file=sys.stderr)
            continue
        paths[f"{name}.png"] = out / f"{name}.png"
        fig.savefig(paths[f"{name}.png"], dpi=100)
        plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``mmdit-probe study`` on its own (``python -m mmdit_probe.cli.study ...``): exit code 0 / 1 (some runs
    failed) / 2 (user error)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} study", description=COMMANDS["study"].description,
                                     formatter_class=HelpFormatter)
    add_study_arguments(parser)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    from . import user_errors

    try:
        return int(run_study(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{PROG} study: error: {msg}", file=sys.stderr)
        return 2


COMMANDS: dict[str, Subcommand] = {
    "study": Subcommand(
        add_study_arguments, run_study, "record a prompt set and aggregate it with bootstrap intervals",
        "Record every prompt (a .csv/.jsonl file, or the shipped shapes-world set) for every seed and setting "
        "(--specs ablations, or --setting variants such as no T5, CFG scale, SLG), aggregating as the runs stream: "
        "exact running mean/variance per cell and per-prompt means for percentile bootstrap intervals over prompts. "
        "Writes OUT/summary.csv (mean, ci_low, ci_high, n), moments.csv, differences.csv (paired by prompt and "
        "seed), word_maps.csv and figures with interval bands. Resumable (--resume); runs on several processes "
        "with `accelerate launch --num_processes N -m mmdit_probe study ...`."),
}

if __name__ == "__main__":
    sys.exit(main())

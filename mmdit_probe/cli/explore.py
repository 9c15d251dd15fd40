"""``mmdit-probe explore``: one self-contained HTML page of a results file or an ablation sweep table,
to look at in a browser, offline (:func:`mmdit_probe.explorer.explore`; plotly is imported only when run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, Subcommand, parse_int_list

SWEEP_SUFFIXES = (".csv", ".parquet")
DEFAULT_MAX_MB = 25.0


def add_explore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results file (.safetensors, from `mmdit-probe record` / result.save()) or "
                                   "ablation sweep table (.csv / .parquet, from `mmdit-probe sweep`)")
    p.add_argument("-o", "--output", default=None, metavar="HTML", help="the page (default: RESULTS with .html)")
    p.add_argument("--image", default=None,
                   help="image drawn under the word maps (default: the image recorded next to the results file)")
    p.add_argument("--title", default=None, help="page title (default: model and prompt, or the table's name)")
    p.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB,
                   help="refuse a page larger than this many MB, saying how to narrow it (0: no limit)")
    g = p.add_argument_group("word maps carried by a results page (their means over all layers, steps and heads "
                             "are always carried)")
    g.add_argument("--words", nargs="+", default=None, help="words (default: all recorded)")
    g.add_argument("--layers", default="all",
                   help="layers with maps of their own, e.g. 0-3,8; 'mean': only the mean over layers")
    g.add_argument("--steps", default="all", help="steps on the step slider, e.g. 0,10,20 or 0-5")
    g.add_argument("--heads", default="none",
                   help="single heads (maps recorded with word_heads='all'), e.g. 0-3 or 'all' (default: none, "
                        "only head means)")
    g.add_argument("--branch", default="all", help="CFG branch: cond, uncond or all")


def run_explore(args: argparse.Namespace) -> int:
    """Write the page and print its size."""
    from ..explorer import explore  # numpy / pandas / plotly: only when a page is made

    src = Path(args.results)
    if not src.is_file():
        raise CLIError(f"{src} does not exist")
    out = Path(args.output) if args.output else src.with_suffix(".html")
    if out.resolve() == src.resolve():
        raise CLIError(f"--output {out} would overwrite the input")
    kwargs: dict = {}
    if src.suffix.lower() in SWEEP_SUFFIXES:
        defaults = {"image": None, "words": None, "layers": "all", "steps": "all", "heads": "none", "branch": "all"}
        given = [k for k, v in defaults.items() if getattr(args, k) != v]
        if given:
            raise CLIError(f"--{', --'.join(given)} select what a results page shows; a sweep table takes none")
    else:
        if args.image and not Path(args.image).is_file():
            raise CLIError(f"--image {args.image!r} does not exist")
        heads = args.heads.strip()
        kwargs = {"image": args.image, "words": args.words,
                  "layers": [] if args.layers.strip() in ("mean", "none") else parse_int_list(args.layers, "layer"),
                  "steps": parse_int_list(args.steps, "step"),
                  "heads": None if heads == "none" else "all" if heads in ("all", "*") else parse_int_list(heads, "head"),
                  "branch": None if args.branch == "all" else args.branch}
    max_bytes = int(args.max_mb * 1e6) if args.max_mb > 0 else None
    page = explore(src, title=args.title, max_bytes=max_bytes, **kwargs)
    page.save(out, quiet=True)
    print(f"wrote {out}: {page.size_text()}")
    return 0


COMMANDS: dict[str, Subcommand] = {
    "explore": Subcommand(
        add_explore_arguments, run_explore, "write an interactive HTML page of a results file or sweep table",
        "Write one self-contained HTML page (data, plotly.js and script inline: it opens offline) to look at a run "
        "in a browser: the quadrant map (layer × step; click a cell to open that layer and step in the other "
        "views), image → word maps over the generated image (word, layer, step slider, head, branch), the per-head "
        "grid of a quadrant and the text key groups; or, for a sweep table, the effect of each ablation by layer "
        "with its spread over seeds and per-step effect curves. Prints the page's size; pages over --max-mb are "
        "refused with the options that narrow them."),
}

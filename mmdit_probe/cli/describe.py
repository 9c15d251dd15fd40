"""``mmdit-probe describe``: components, text/image shapes, MMDiT and scheduler of a model (:func:`mmdit_probe.describe`).

Any supported family (SD3 / SD3.5, Flux.1 / Kontext, Chroma, Qwen-Image, Flux.2; a hub id or a saved folder). The
text length and step count shown are those ``mmdit-probe record`` / ``demo`` would run the model with.
"""

from __future__ import annotations

import argparse
import sys

from ..describe import describe, format_value
from .common import CLIError, Subcommand, add_model_arguments, check_output_file, get_pipeline


def add_describe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="the model, as for --model (`describe MODEL` and `describe --model MODEL` are the same)")
    p.add_argument("--prompt", default=None,
                   help="run the text encoders on this prompt and report measured shapes (default: shapes read "
                        "from the configs)")
    p.add_argument("--format", default="text", choices=("text", "csv", "json"), help="output format")
    p.add_argument("--no-sources", action="store_true", help="text format: hide where each value was read from")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="write here (default: standard output)")
    add_model_arguments(p, generation=False)


def run_describe(args: argparse.Namespace) -> int:
    """Print (or write) the description; the model's run kwargs give the text length and steps unless set."""
    if args.model_arg is not None and args.model not in ("default", args.model_arg):
        raise CLIError(f"two models given: MODEL {args.model_arg!r} and --model {args.model!r}; give one")
    args.model = args.model_arg or args.model
    if args.output:
        check_output_file(args.output, "--output")
    pipe = get_pipeline(args.model, device=args.device, dtype=args.dtype)
    desc = describe(pipe, args.prompt, args.height, args.width, args.max_sequence_length, args.steps)
    if args.format == "text":
        out = desc.to_text(sources=not args.no_sources) + "\n"
    else:
        table = desc.table.assign(value=desc.table["value"].map(format_value))
        out = table.to_csv(index=False) if args.format == "csv" else table.to_json(orient="records", indent=1) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(out)
    else:
        sys.stdout.write(out)
    return 0


COMMANDS: dict[str, Subcommand] = {
    "describe": Subcommand(
        add_describe_arguments, run_describe, "components, shapes, MMDiT and scheduler of a model",
        "Print every component (class, parameters, dtype, device), the text and image paths with their shapes "
        "(measured with --prompt), the MMDiT blocks by layer and kind, rotary axes and attention masks, the "
        "scheduler's timesteps/sigmas as the pipeline sets them and (Flux.1, Chroma, Qwen-Image, Flux.2) the call "
        "defaults, all read from the objects. The text length (max_sequence_length) and step count are those the "
        "model runs with (its run kwargs) unless --max-sequence-length / --steps are given."),
}

"""What the subcommands share: errors, the help formatter, model loading and generation options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

import torch

PROG = "mmdit-probe"
EMBEDDED_MODELS = ("default", "shapes", "tiny", "tiny-sd3", "tiny-sd35")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CLIError(Exception):
    """A user error: printed as ``error: <message>``, exit code 2."""


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args) -> int | None`` does it."""

    add_arguments: Callable[[argparse.ArgumentParser], Any]
    run: Callable[[argparse.Namespace], int | None]
    help: str = ""
    description: str | None = None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help only when the help does not already talk about its
    default and there is a default worth showing (not None / False / empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False or default in ([], "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def is_embedded(model: str) -> bool:
    """True for the models built into the package (``default``, ``shapes``, the tiny ones)."""
    return model.lower() in EMBEDDED_MODELS


def parse_dtype(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    if name not in DTYPES:
        raise CLIError(f"unknown --dtype {name!r}; use float32, bfloat16 or float16")
    return DTYPES[name]


def get_pipeline(model: str = "default", device: str | None = None, dtype: str | None = None, flag: str = "--model"):
    """Pipeline by CLI name: ``default``, ``shapes``, ``tiny``/``tiny-sd3``/``tiny-sd35``, a hub id or a folder.

    Missing weights become a :class:`CLIError` whose instructions name the CLI option ``flag``. Embedded
    models carry the run kwargs the CLI uses for them (``pipe.shipped_run_kwargs``; describe() reads them).
    """
    # models / shapes import the diffusers pipelines: loaded only when a command needs a model
    from ..models import WeightsNotAvailableError, how_to_get, load_pipeline
    from ..shapes import default_pipeline, default_run_kwargs, shapes_pipeline

    torch_dtype = parse_dtype(dtype)
    name = model.lower()
    try:
        if name in ("default", "shapes"):
            pipe = default_pipeline() if name == "default" else shapes_pipeline()
            if torch_dtype is not None:
                pipe = pipe.to(dtype=torch_dtype)
        else:
            pipe = load_pipeline(model, torch_dtype=torch_dtype)
    except WeightsNotAvailableError as err:
        raise CLIError(f"{err.problem}\n{how_to_get(err.model, flag=flag)}") from err
    if is_embedded(model) and not getattr(pipe, "shipped_run_kwargs", None):
        pipe.shipped_run_kwargs = default_run_kwargs(pipe, embedded=True)
    return pipe.to(device) if device else pipe


def add_model_arguments(p: argparse.ArgumentParser, *, generation: bool = True) -> argparse._ArgumentGroup:
    """``--model``, ``--device``, ``--dtype``, ``--steps``, ``--height``, ``--width``, ``--max-sequence-length``
    and, with ``generation``, ``--seed``, ``--guidance``, ``--no-progress``."""
    g = p.add_argument_group("model and generation" if generation else "model")
    g.add_argument("--model", default="default",
                   help="'default' (the default: the embedded trained shapes model, or the random tiny SD3 when its "
                        "weights are missing), 'shapes', 'tiny' / 'tiny-sd3', 'tiny-sd35' (random, tiny), a Hugging "
                        "Face id such as stabilityai/stable-diffusion-3.5-medium, or a local diffusers folder")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda (default: where the model is loaded, cpu)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), metavar="DTYPE",
                   help="float32, bfloat16 or float16 (default: the model's own)")
    g.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps (default: the model's run kwargs: 20 for the shapes model, 8 for tiny "
                        "models, 28 otherwise)")
    g.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's)")
    g.add_argument("--max-sequence-length", type=positive_int, default=None, metavar="N",
                   help="T5 tokens (default: the model's run kwargs: 12 for the shapes model, 16 for tiny models, "
                        "256 otherwise)")
    if generation:
        g.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
        g.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance scale, <= 1 disables CFG (default: the model's run kwargs, 5)")
        g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return g


def run_kwargs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """``num_inference_steps``, ``guidance_scale``, ``max_sequence_length``: the options given, else the model's."""
    from ..shapes import default_run_kwargs  # with get_pipeline: the diffusers pipelines are loaded by now

    base = default_run_kwargs(pipe, embedded=is_embedded(args.model))
    given = {"num_inference_steps": args.steps, "guidance_scale": getattr(args, "guidance", None),
             "max_sequence_length": args.max_sequence_length}
    return {k: base[k] if given[k] is None else given[k] for k in base}


def generation_kwargs(args: argparse.Namespace, prompt: str, pipe: Any) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)`` from the shared options (unset ones from the model's run kwargs)."""
    kw: dict[str, Any] = {"prompt": prompt, **run_kwargs(args, pipe),
                          "generator": torch.Generator("cpu").manual_seed(args.seed)}
    if args.height:
        kw["height"] = args.height
    if args.width:
        kw["width"] = args.width
    return kw


def set_progress(pipe: Any, args: argparse.Namespace, desc: str = "denoising") -> None:
    """Show (or hide) the pipeline's tqdm progress bar."""
    pipe.set_progress_bar_config(disable=bool(getattr(args, "no_progress", False)), desc=desc, leave=False)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def parse_int_list(text: str, what: str = "value") -> list[int] | None:
    """``"0,2,5-7"`` → ``[0, 2, 5, 6, 7]``; ``""``/``"all"``/``"*"`` → None (all)."""
    text = text.strip()
    if text in ("", "all", "*"):
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise CLIError(f"bad {what} list {text!r}; use e.g. 0,2,5-7 or 'all'") from None
    return out

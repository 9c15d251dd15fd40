"""``mmdit-probe`` command line: ``demo``, ``record``, ``plot``, ``sweep``, ``show`` (+ registered extras).

Extra subcommands are registered with :func:`register_subcommand` (or by adding to
:data:`SUBCOMMANDS`) before :func:`main` runs::

    from mmdit_probe.cli import register_subcommand
    register_subcommand("describe", add_arguments=lambda p: p.add_argument("results"),
                        run=lambda args: print(args.results) or 0, help="describe a results file")

``run(args)`` returns the exit code (None = 0); raising :class:`CLIError` (or another user error,
see :data:`USER_ERRORS`) prints ``error: ...`` and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

EMBEDDED_MODELS = ("default", "shapes", "tiny", "tiny-sd3", "tiny-sd35")
PROG = "mmdit-probe"


class CLIError(Exception):
    """A user error: printed as ``error: <message>``, exit code 2."""


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args) -> int | None`` does it."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    help: str = ""
    description: str | None = None


#: name -> Subcommand, in the order shown by ``--help``. Built-ins are added on first use.
SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, add_arguments: Callable, run: Callable, help: str = "",
                        description: str | None = None, *, replace: bool = False) -> None:
    """Add ``mmdit-probe <name>``; ``replace=True`` overrides an existing one."""
    if name in SUBCOMMANDS and not replace:
        raise ValueError(f"subcommand {name!r} is already registered (pass replace=True to override)")
    SUBCOMMANDS[name] = Subcommand(add_arguments, run, help, description)


def _register_builtins() -> None:
    from . import cli_commands, cli_sweep

    for name, sub in {**cli_commands.COMMANDS, **cli_sweep.COMMANDS}.items():
        SUBCOMMANDS.setdefault(name, sub)
    from .cli_shapes import DELEGATED, add_forwarded_arguments, run_delegated
    from .describe import add_describe_arguments, run_describe

    for name, (_, _, help_) in DELEGATED.items():
        SUBCOMMANDS.setdefault(name, Subcommand(add_forwarded_arguments, lambda a, n=name: run_delegated(n, a.options),
                                                help_, f"{help_}. Run `{PROG} {name} --help` for its options."))

    SUBCOMMANDS.setdefault("describe", Subcommand(
        add_describe_arguments, run_describe, "components, shapes, MMDiT and scheduler of a pipeline",
        "Print every component (class, parameters, dtype, device), the text and image paths with their measured "
        "shapes, the MMDiT blocks and the scheduler's timesteps/sigmas, all read from the objects."))


def _user_errors() -> tuple[type[BaseException], ...]:
    from .io import ResultsFileError
    from .maps import MapBudgetError
    from .models import WeightsNotAvailableError

    return (CLIError, FileNotFoundError, IsADirectoryError, PermissionError, ResultsFileError,
            WeightsNotAvailableError, MapBudgetError, KeyError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (built-in and registered subcommands)."""
    _register_builtins()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mechanistic interpretability for MMDiT diffusion transformers (SD3 / SD3.5): record exact "
                    "per-head joint attention, plot quadrant maps and word heatmaps, run ablation sweeps.",
        epilog=f"Run `{PROG} <command> --help` for the options of each command. Start with `{PROG} demo`.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, sub in SUBCOMMANDS.items():
        p = subs.add_parser(name, help=sub.help, description=sub.description or sub.help,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_arguments(p)
        p.set_defaults(_run=sub.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmdit-probe``; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    from .cli_shapes import DELEGATED, run_delegated

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in DELEGATED:  # options are the shapes script's own (its --help lists them)
            args = argparse.Namespace(command=argv[0], _run=lambda a: run_delegated(argv[0], argv[1:]))
        else:
            args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help / --version (0) and argparse errors (2)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    try:
        code = args._run(args)
    except SystemExit as exit_:  # a forwarded script's argparse (--help: 0, bad options: 2)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(code or 0)


# ---------------------------------------------------------------------------------- shared helpers


def default_pipeline(**kwargs: Any):
    """The embedded default model: the trained "shapes" pipeline when it and its weights are
    present, else the random tiny SD3 pipeline. Works offline, on CPU."""
    try:
        from .shapes import shapes_pipeline  # type: ignore[attr-defined]
    except ImportError:
        shapes_pipeline = None
    if shapes_pipeline is not None:
        from .models import WeightsNotAvailableError

        try:
            return shapes_pipeline(**kwargs)
        except (FileNotFoundError, WeightsNotAvailableError):
            pass  # weights not shipped in this checkout
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            import warnings

            warnings.warn(f"shapes model could not be loaded ({err}); using the random tiny pipeline", stacklevel=2)
    from .models import tiny_sd3_pipeline

    return tiny_sd3_pipeline(**kwargs)


def default_run_kwargs(pipe: Any, embedded: bool = True) -> dict[str, Any]:
    """``num_inference_steps``, ``guidance_scale`` and ``max_sequence_length`` that suit ``pipe``:
    the trained values for the shapes model, small ones for other embedded models, SD3 defaults otherwise."""
    cfg = getattr(pipe, "shapes_config", None)
    if cfg is not None:
        return {"num_inference_steps": cfg.default_steps, "guidance_scale": cfg.default_guidance,
                "max_sequence_length": cfg.max_sequence_length}
    if embedded:
        return {"num_inference_steps": 8, "guidance_scale": 5.0, "max_sequence_length": 16}
    return {"num_inference_steps": 28, "guidance_scale": 5.0, "max_sequence_length": 256}


def is_embedded(model: str) -> bool:
    return model.lower() in EMBEDDED_MODELS


def get_pipeline(model: str = "default", device: str | None = None, dtype: str | None = None):
    """Pipeline by CLI name: ``default``, ``shapes``, ``tiny``/``tiny-sd3``/``tiny-sd35``, a hub id or a folder."""
    import torch

    torch_dtype = None
    if dtype:
        torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                       "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype)
        if torch_dtype is None:
            raise CLIError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    name = model.lower()
    if name == "default":
        pipe = default_pipeline()
    elif name == "shapes":
        try:
            from .shapes import shapes_pipeline  # type: ignore[attr-defined]
        except ImportError as err:
            raise CLIError("the shapes model is not available in this installation; use --model tiny") from err
        pipe = shapes_pipeline()
    else:
        from .models import load_pipeline

        pipe = load_pipeline(model, torch_dtype=torch_dtype)
        torch_dtype = None
    if torch_dtype is not None:
        pipe = pipe.to(dtype=torch_dtype)
    if device:
        pipe = pipe.to(device)
    return pipe


def add_model_arguments(p: argparse.ArgumentParser, *, steps_help: str = "") -> None:
    """Options shared by commands that run the pipeline."""
    g = p.add_argument_group("model and generation")
    g.add_argument("--model", default="default",
                   help="'default' (embedded shapes model if installed, else tiny random SD3), 'tiny', 'tiny-sd3', "
                        "'tiny-sd35', 'shapes', a Hugging Face id such as stabilityai/stable-diffusion-3.5-medium, "
                        "or a local diffusers folder")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu / as loaded)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (default: the shapes model's trained value, 8 for tiny models, 28 otherwise)"
                        + steps_help)
    g.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, <= 1 disables CFG (default: the shapes model's stored value, 5; 5 otherwise)")
    g.add_argument("--max-sequence-length", type=_positive_int, default=None,
                   help="T5 tokens (default: the shapes model's 12, 16 for tiny models, 256 otherwise)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def generation_kwargs(args: argparse.Namespace, prompt: str, pipe: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)`` from the shared options (unset ones from :func:`default_run_kwargs`)."""
    import torch

    base = default_run_kwargs(pipe, embedded=is_embedded(args.model))
    kw: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": args.steps or base["num_inference_steps"],
        "guidance_scale": base["guidance_scale"] if args.guidance is None else args.guidance,
        "max_sequence_length": args.max_sequence_length or base["max_sequence_length"],
        "generator": torch.Generator("cpu").manual_seed(args.seed),
    }
    if args.height:
        kw["height"] = args.height
    if args.width:
        kw["width"] = args.width
    return kw


def set_progress(pipe, args: argparse.Namespace, desc: str = "denoising") -> None:
    """Show (or hide) the pipeline's tqdm progress bar."""
    pipe.set_progress_bar_config(disable=bool(getattr(args, "no_progress", False)), desc=desc, leave=False)


def _positive_int(text: str) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

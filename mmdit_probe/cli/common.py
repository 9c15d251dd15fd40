"""What the subcommands share: errors, the help formatter, model loading, generation options, and the checks
of every input that run before a model loads (device, output paths, images, integer ranges)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

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
    device = check_device(device)
    torch_dtype = parse_dtype(dtype)
    # models / shapes import the diffusers pipelines: loaded only when a command needs a model
    from ..models import WeightsNotAvailableError, how_to_get, load_pipeline
    from ..shapes import default_pipeline, default_run_kwargs, shapes_pipeline

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
    g.add_argument("--steps", type=int_in(1, MAX_STEPS), default=None,
                   help="denoising steps (default: the model's run kwargs: 20 for the shapes model, 8 for tiny "
                        "models, 28 otherwise)")
    size = int_in(1, MAX_SIZE)
    g.add_argument("--height", type=size, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=size, default=None, help="image width in pixels (default: the model's)")
    g.add_argument("--max-sequence-length", type=int_in(1, MAX_T5), default=None, metavar="N",
                   help="T5 tokens (default: the model's run kwargs: 12 for the shapes model, 16 for tiny models, "
                        "256 otherwise)")
    if generation:
        g.add_argument("--seed", type=seed_int, default=0, help="random seed of the initial noise (0 to 2**64-1)")
        g.add_argument("--guidance", type=finite_float, default=None,
                       help="classifier-free guidance scale, <= 1 disables CFG (default: the model's run kwargs, 5)")
        g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return g


def run_kwargs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """``num_inference_steps``, ``guidance_scale``, ``max_sequence_length``: the options given, else the model's."""
    from ..shapes import default_run_kwargs  # with get_pipeline: the diffusers pipelines are loaded by now

    base = default_run_kwargs(pipe, embedded=is_embedded(args.model))
    given = {"num_inference_steps": args.steps, "guidance_scale": getattr(args, "guidance", None),
             "max_sequence_length": args.max_sequence_length}
    return {**base, **{k: v for k, v in given.items() if v is not None}}


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


MAX_STEPS, MAX_SIZE, MAX_T5, MAX_SEED = 10_000, 16_384, 512, 2**64 - 1


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number ``lo <= n <= hi`` (no upper bound if ``hi`` is None)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            what = "a positive integer" if lo == 1 else "an integer"
            span = f" from {lo} to {hi}" if hi is not None else ""
            raise argparse.ArgumentTypeError(f"expected {what}{span}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


positive_int = int_in(1)
seed_int = int_in(0, MAX_SEED)  # torch.Generator.manual_seed takes 64 bits


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan / inf)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


# ---- checks that run before a model loads ----------------------------------------------------------------------
def check_device(device: str | None) -> str | None:
    """``device`` if torch can use it here, else a :class:`CLIError` (unknown name, no such accelerator)."""
    if not device:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown --device {device!r}; use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cpu":
        return device
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise CLIError(f"--device {device}: no {dev.type} device is available to this torch ({torch.__version__}) on "
                       f"this machine; use --device cpu (the default)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise CLIError(f"--device {device}: this machine has {count()} {dev.type} device(s), numbered from 0")
    return device


def _writable_folder(folder: Path, flag: str, given: str) -> None:
    """The nearest existing folder at or above ``folder`` must be a folder we may create files in."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CLIError(f"{flag} {given!r}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise CLIError(f"{flag} {given!r}: cannot write in {probe} ({err.strerror or err})") from None


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file that will be written: not a folder, and its folder can be created and written."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {str(path)!r} is a folder; give a file name")
    _writable_folder(p.parent, flag, str(path))
    return p


def check_output_folder(path: str | os.PathLike, flag: str = "--out", files: Iterable[str] = ()) -> Path:
    """A folder that will be written: not a file, writable, and none of ``files`` in it a folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {str(path)!r} is a file; give a folder (it is created if missing)")
    _writable_folder(p, flag, str(path))
    for name in files:
        if (p / name).is_dir():
            raise CLIError(f"{flag} {str(path)!r}: {p / name} is a folder, but a file of that name is written there")
    return p


def check_map_steps(maps: list[Any], texts: list[str], n_steps: int) -> None:
    """Refuse a ``--maps`` whose steps lie beyond the run's ``n_steps`` (it would keep nothing)."""
    for m, text in zip(maps, texts):
        late = [s for s in m.steps or () if s >= n_steps]
        if late:
            raise CLIError(f"--maps {text!r}: step(s) {late} do not exist: the run has {n_steps} steps, numbered "
                           f"0-{n_steps - 1} (set --steps, or pick steps below {n_steps})")


def warn_if_not_finite(args: argparse.Namespace, res: Any) -> None:
    """Tell "recorded NaN" from "not recorded": the library drops NaN rows, so all-NaN masses give empty tables."""
    values = res.mass.values
    if values.numel() and not bool(values.isfinite().any()):
        warn(args, "every recorded attention mass is NaN or infinite (the run itself produced non-finite values, "
                   "e.g. NaN weights or a float16 overflow), so the tables and figures are empty; record again, "
                   "e.g. with --dtype float32")


def open_image(path: str | os.PathLike, flag: str = "--image") -> Any:
    """The image at ``path`` (PIL, fully read), or a :class:`CLIError` naming ``flag``."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {str(path)!r} {'is a folder' if p.is_dir() else 'does not exist'}; give an image file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CLIError(f"{flag} {str(path)!r} is not an image file that can be read ({err})") from None


def parse_int_list(text: str, what: str = "value") -> list[int] | None:
    """``"0,2,5-7"`` → ``[0, 2, 5, 6, 7]``; ``""``/``"all"``/``"*"`` → None (all). Indices count from 0; a
    range ``a-b`` needs ``a <= b``."""
    text = text.strip()
    if text in ("", "all", "*"):
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            lo, hi = int(a), int(b if b else a)
            if lo > hi or hi - lo > 100_000:
                raise ValueError
            out += range(lo, hi + 1)
    except ValueError:
        raise CLIError(f"bad {what} list {text!r}; use indices from 0, e.g. 0,2,5-7 or 'all'") from None
    return out


def warn(args: argparse.Namespace, message: str) -> None:
    """Print ``mmdit-probe <command>: warning: <message>`` on stderr."""
    import sys

    print(f"{PROG} {getattr(args, 'command', '')}: warning: {message}", file=sys.stderr)

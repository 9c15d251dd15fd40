"""``mmdit-probe train-shapes`` / ``evaluate-shapes`` / ``recover-shapes``: hand the rest of the command line to the shapes scripts.

Their options are defined once, in :mod:`mmdit_probe.shapes.train`, :mod:`~mmdit_probe.shapes.evaluate`
and :mod:`~mmdit_probe.shapes.recovery` (``python -m mmdit_probe.shapes.train --help`` shows the same);
the subcommands here only forward. The scripts are imported when run (training pulls in its own stack).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Sequence

from .common import PROG, Subcommand

#: subcommand -> (module, entry point taking argv, one-line help)
DELEGATED: dict[str, tuple[str, str, str]] = {
    "train-shapes": ("mmdit_probe.shapes.train", "train_main",
                     "train the embedded shapes model (VAE + SD3 MMDiT, or --arch flux: a Flux transformer on its "
                     "VAE and text encoders); --device cuda; resumable checkpoints"),
    "evaluate-shapes": ("mmdit_probe.shapes.evaluate", "evaluate_main",
                        "measure the shapes model (SD3 or Flux): prompt adherence, word grounding per layer and "
                        "block kind, ablation sanity"),
    "recover-shapes": ("mmdit_probe.shapes.recovery", "recovery_main",
                       "when are shapes decided: finish noised ground-truth scenes from each noise level"),
}


def run_delegated(name: str, argv: Sequence[str]) -> int:
    """Run the shapes script of subcommand ``name`` with ``argv`` (its own argparse handles ``--help``)."""
    module, func, _ = DELEGATED[name]
    entry = getattr(importlib.import_module(module), func)
    entry(list(argv))
    return 0


def add_forwarded_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="the script's own options, forwarded unchanged (its --help lists them)")


COMMANDS: dict[str, Subcommand] = {
    name: Subcommand(add_forwarded_arguments, lambda a, n=name: run_delegated(n, a.options), help_,
                     f"{help_[0].upper()}{help_[1:]}. Run `{PROG} {name} --help` for its options.")
    for name, (_, _, help_) in DELEGATED.items()
}

"""``mmdit-probe sweep``: ablation sweeps into CSV/parquet plus effect plots (filled in below)."""

from __future__ import annotations

import argparse

from .cli import CLIError, Subcommand, add_model_arguments


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("skip-layers", "zero-text", "knock-out"), default="skip-layers")
    p.add_argument("--prompt", action="append", default=None)
    add_model_arguments(p)


def run_sweep(args: argparse.Namespace) -> int:
    raise CLIError("ablation sweeps need mmdit_probe.sweep, which is not available yet")


COMMANDS = {"sweep": Subcommand(_sweep_args, run_sweep, "run an ablation sweep into CSV/parquet plus plots")}

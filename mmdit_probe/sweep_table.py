"""Reading a saved sweep table back: every row checked against the sweep's settings, runs checked complete.

A row is ``prompt, seed, spec, spec_index, metric, step, value``: the prompt and seed must be the sweep's,
``spec`` must be the description of entry ``spec_index``, ``metric`` one of its metrics, ``step`` empty for
final-output metrics and ``0 … transformer_calls - 1`` for per-step ones, ``value`` a number (empty or
``nan`` = NaN). A key (prompt, seed, spec_index, metric, step) may appear once. Anything else raises
:class:`~mmdit_probe.sweep_settings.SweepFileError` naming the file and line. A last line without a line
end (a copy cut mid-row) is dropped with a warning; its run is then incomplete and is run again.
"""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from .sweep_settings import SweepFileError

COLUMNS = ["prompt", "seed", "spec", "spec_index", "metric", "step", "value"]
RESTART = "restore it from a copy, or start a new sweep in another folder"


def _int(text: str) -> int:
    """``"3"`` (or ``"3.0"``, as pandas writes a column with gaps) → 3; anything else: ``ValueError``."""
    match = re.fullmatch(r"\s*(-?\d+)(?:\.0*)?\s*", text)
    if match is None:
        raise ValueError(text)
    return int(match.group(1))


def _value(text: str) -> float:
    return math.nan if text.strip() == "" else float(text)


def _text(path: Path) -> str:
    data = path.read_bytes()
    if not data:
        raise SweepFileError(f"{path} is empty (0 bytes), not a sweep table: delete it and its settings file to "
                             f"start the sweep again, or {RESTART}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SweepFileError(f"{path} is not a sweep table (not UTF-8 text at byte {err.start}); {RESTART}") from None
    if not text.endswith("\n"):
        cut = text.rfind("\n")
        if cut < 0:
            raise SweepFileError(f"{path}: line 1 (the header) is cut off; not a sweep table; {RESTART}")
        line = text.count("\n", 0, cut) + 2
        warnings.warn(f"{path}: line {line} is cut off (no line end, the file was truncated): dropped; its run is "
                      f"run again", UserWarning, stacklevel=4)
        text = text[:cut + 1]
    return text


def _header(path: Path, header: list[str]) -> dict[str, int]:
    if sorted(header) != sorted(COLUMNS):
        raise SweepFileError(f"{path} is not a sweep table: line 1 has the columns {header}, expected {COLUMNS}; "
                             f"pass another save_to (or --out), or {RESTART}")
    return {c: header.index(c) for c in COLUMNS}


def _row(fields: list[str], col: dict[str, int], settings: Mapping[str, Any], kinds: dict[str, str]) -> dict:
    """One row as a dict; ``ValueError`` (message without file and line) if it does not fit the settings."""
    get = {c: fields[i] for c, i in col.items()}
    row: dict[str, Any] = {"prompt": get["prompt"], "spec": get["spec"], "metric": get["metric"]}
    for name in ("seed", "spec_index"):
        try:
            row[name] = _int(get[name])
        except ValueError:
            raise ValueError(f"{name} {get[name]!r} is not a whole number") from None
    try:
        row["value"] = _value(get["value"])
    except ValueError:
        raise ValueError(f"value {get['value']!r} is not a number") from None
    if row["prompt"] not in settings["prompts"]:
        raise ValueError(f"prompt {row['prompt']!r} is not one of the sweep's prompts {settings['prompts']}")
    if row["seed"] not in settings["seeds"]:
        raise ValueError(f"seed {row['seed']} is not one of the sweep's seeds {settings['seeds']}")
    specs = settings["specs"]
    if not 0 <= row["spec_index"] < len(specs) or specs[row["spec_index"]] != row["spec"]:
        expected = repr(specs[row["spec_index"]]) if 0 <= row["spec_index"] < len(specs) else "none"
        raise ValueError(f"spec {row['spec']!r} at spec_index {row['spec_index']}; the sweep's spec there is "
                         f"{expected}")
    kind = kinds.get(row["metric"])
    if kind is None:
        raise ValueError(f"metric {row['metric']!r} is not one of the sweep's metrics {sorted(kinds)}")
    step = get["step"].strip()
    if kind != "velocity":
        if step:
            raise ValueError(f"step {step!r} on the final-output metric {row['metric']!r} (must be empty)")
        row["step"] = None
        return row
    calls = settings.get("transformer_calls")
    try:
        row["step"] = _int(step)
    except ValueError:
        raise ValueError(f"step {step!r} of the per-step metric {row['metric']!r} is not a whole number") from None
    if row["step"] < 0 or (calls is not None and row["step"] >= calls):
        raise ValueError(f"step {row['step']} out of range (the runs made {calls} transformer calls)")
    return row


def peek_header(path: str | Path) -> None:
    """Refuse a file whose first line is not a sweep table's header (:class:`SweepFileError`)."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        header = next(csv.reader([fh.readline()]), [])
    _header(path, header)


def read_table(path: str | Path, settings: Mapping[str, Any]) -> list[dict]:
    """Rows of a sweep table, checked (see the module docstring); refuses with the file and line number."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_text(path), newline=""), strict=True)
    kinds = {m["name"]: m["on"] for m in settings["metrics"]}
    rows: list[dict] = []
    first: dict[tuple, int] = {}
    line = 0
    try:
        header = next(reader, None)
        if header is None:
            raise SweepFileError(f"{path} has no header line: not a sweep table; {RESTART}")
        col = _header(path, header)
        line = reader.line_num
        for fields in reader:
            start, line = line + 1, reader.line_num
            if len(fields) != len(header):
                raise SweepFileError(f"{path}: line {start} has {len(fields)} fields, expected {len(header)}; "
                                     f"{RESTART}")
            try:
                row = _row(fields, col, settings, kinds)
            except ValueError as err:
                raise SweepFileError(f"{path}: line {start}: {err}; {RESTART}") from None
            key = (row["prompt"], row["seed"], row["spec_index"], row["metric"], row["step"])
            if key in first:
                raise SweepFileError(f"{path}: line {start} repeats line {first[key]} (prompt {key[0]!r}, seed "
                                     f"{key[1]}, spec_index {key[2]}, metric {key[3]}, step {key[4]}); remove one "
                                     f"of them, or {RESTART}")
            first[key] = start
            rows.append(row)
    except csv.Error as err:
        raise SweepFileError(f"{path}: line {line + 1} is not valid CSV ({err}); {RESTART}") from None
    return rows


def incomplete_runs(rows: Iterable[dict], settings: Mapping[str, Any]) -> dict[tuple, str]:
    """``{(prompt, seed, spec_index): what is missing}`` for every run in ``rows`` lacking a metric or step."""
    calls = settings.get("transformer_calls")
    kinds = {m["name"]: m["on"] for m in settings["metrics"]}
    seen: dict[tuple, dict[str, set]] = {}
    for r in rows:
        seen.setdefault((r["prompt"], r["seed"], r["spec_index"]), {}).setdefault(r["metric"], set()).add(r["step"])
    out = {}
    for run, metrics in seen.items():
        missing = [m for m in kinds if m not in metrics]
        if calls is not None:
            missing += [f"{m} steps" for m, on in kinds.items()
                        if on == "velocity" and m in metrics and metrics[m] != set(range(calls))]
        elif len({frozenset(metrics[m]) for m, on in kinds.items() if on == "velocity" and m in metrics}) > 1:
            missing.append("velocity steps")
        if missing:
            out[run] = ", ".join(missing)
    return out


# ---- shards of a sweep on several processes ------------------------------------------------------
def table_shard(table: str | Path, rank: int, world: int) -> Path:
    """Rank ``rank``'s table of a sweep saved as ``table`` on ``world`` processes:
    ``<folder>/shards/<stem>-<rank>-of-<world>.csv`` (naming of :mod:`mmdit_probe.study.shards`)."""
    from .study.shards import shard_path  # the study package imports the whole library: lazily

    table = Path(table)
    return shard_path(table.parent, rank, world, table.stem, "csv")


def shard_tables(table: str | Path) -> list[Path]:
    """Every shard table of the sweep saved as ``table``, of any number of processes, by (world, rank)."""
    from .study.shards import find_shards

    table = Path(table)
    found = find_shards(table.parent, table.stem, "csv")
    return [p for world in sorted(found) for p in found[world]]


def run_key(row: Mapping[str, Any]) -> tuple:
    """``(prompt, seed, spec_index)``: the run a row belongs to."""
    return row["prompt"], row["seed"], row["spec_index"]


def read_runs(paths: Iterable[str | Path], settings: Mapping[str, Any], warn: bool = True
              ) -> dict[Path, list[dict]]:
    """The complete runs of several tables of one sweep (the saved table and its shards), per file.

    Each file is read with :func:`read_table`; a run missing a metric or step is dropped (with a warning
    naming the file when ``warn``) and so is a run already complete in an earlier file, so every run
    comes from one file, with its rows in that file's order.
    """
    out: dict[Path, list[dict]] = {}
    seen: set[tuple] = set()
    for path in map(Path, paths):
        rows = read_table(path, settings)
        bad = incomplete_runs(rows, settings)
        if bad and warn:
            listed = "; ".join(f"prompt {p!r}, seed {s}, spec_index {i}: missing {what}" for (p, s, i), what in
                               list(bad.items())[:3])
            warnings.warn(f"{path}: {len(bad)} run(s) incomplete ({listed}{'; …' if len(bad) > 3 else ''}): "
                          f"their rows are dropped and the runs done again", UserWarning, stacklevel=4)
        keep = [r for r in rows if run_key(r) not in bad and run_key(r) not in seen]
        seen |= {run_key(r) for r in keep}
        out[path] = keep
    return out

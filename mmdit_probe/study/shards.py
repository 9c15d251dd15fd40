"""Splitting a study over processes (``accelerate``), one shard file per rank, resume and merge.

* :class:`Ranks` wraps ``accelerate.PartialState``: rank, world size, ``split_between_processes``.
  Work is split by *prompt* (a rank runs all seeds and settings of its prompts), so a prompt's
  per-prompt means and its paired differences never cross ranks.
* A rank's shard ``OUT/shards/shard-<rank>-of-<world>.npz`` holds its whole state
  (:class:`~mmdit_probe.study.state.StudyState`: moments, per-prompt sums, the finished
  ``(prompt, seed, setting)`` units, failures). It is rewritten atomically (temporary file in the same
  folder, fsync, ``os.replace``), so a killed rank leaves the previous complete shard, and a rerun with
  the same world size resumes from it, skipping every finished unit.
* When a rank is through, it marks its shard complete for this launch (``shard-….npz.done`` holding a
  session id broadcast from rank 0); every rank then waits for all shards of the launch and merges them in rank order
  (:func:`~mmdit_probe.study.state.merge_states`: exact integer moment sums, canonical cell order),
  so the merged tables equal a single-process run's bit for bit.

Shards are ``numpy.savez`` files read with ``allow_pickle=False``. The file naming, the completion
markers, :class:`Ranks` and :func:`wait_for_shards` also serve the sharded ``sweep``
(``OUT/shards/<table stem>-<rank>-of-<world>.csv``, see :mod:`mmdit_probe.sweep`): ``name`` / ``ext`` pick
the files.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .state import StudyState

__all__ = ["Ranks", "shard_path", "write_shard", "read_shard", "find_shards", "wait_for_shards", "mark_complete",
           "read_marker", "ShardError"]


def _shard_re(name: str, ext: str) -> re.Pattern:
    return re.compile(rf"{re.escape(name)}-(\d+)-of-(\d+)\.{re.escape(ext)}")


class ShardError(ValueError):
    """A shard that cannot be used (another study, another world size, unreadable)."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def launched() -> bool:
    """True when started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class Ranks:
    """This process's place in the launch (``accelerate.PartialState``; one process when not launched)."""

    def __init__(self):
        self.state = None
        self.rank, self.world = 0, 1
        if launched():
            import torch
            from accelerate import PartialState

            cpu = _truthy("ACCELERATE_USE_CPU") or not torch.cuda.is_available()  # gloo on CPU-only machines
            self.state = PartialState(cpu=cpu)
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> Any:
        return None if self.state is None else self.state.device

    def split(self, items: Sequence) -> list:
        """This rank's contiguous share of ``items`` (``PartialState.split_between_processes``)."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as part:
            return list(part)

    def barrier(self) -> None:
        """Wait until every rank got here (``PartialState.wait_for_everyone``; nothing on one process)."""
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def session_id(self) -> str:
        """A fresh id for this launch, the same on every rank (rank 0's, broadcast)."""
        token = secrets.token_hex(8)
        if self.world > 1:
            import torch.distributed as dist

            box = [token]
            dist.broadcast_object_list(box, src=0)
            token = box[0]
        return token


def shard_path(out: str | os.PathLike, rank: int, world: int, name: str = "shard", ext: str = "npz") -> Path:
    """``OUT/shards/<name>-<rank>-of-<world>.<ext>`` (three-digit numbers)."""
    return Path(out) / "shards" / f"{name}-{rank:03d}-of-{world:03d}.{ext}"


def find_shards(out: str | os.PathLike, name: str = "shard", ext: str = "npz") -> dict[int, list[Path]]:
    """Shard files under ``OUT/shards`` by world size (each list in rank order)."""
    folder = Path(out) / "shards"
    pattern = _shard_re(name, ext)
    found: dict[int, list[Path]] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            m = pattern.fullmatch(p.name)
            if m:
                found.setdefault(int(m.group(2)), []).append(p)
    return found


def write_shard(path: str | os.PathLike, state: StudyState, extra: dict | None = None) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    from ..io import atomic_write

    arrays = state.to_arrays(extra)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would add ".npz" to a name
            np.savez(fh, **arrays)

    atomic_write(path, write)


def read_shard(path: str | os.PathLike) -> StudyState:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return StudyState.from_arrays(arrays)
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ShardError(f"{path}: not a readable study shard ({err}); move it away to start that rank afresh") from err


def mark_complete(path: str | os.PathLike, session: str, info: dict | None = None) -> None:
    """Say that the shard at ``path`` is final for launch ``session`` (a small marker file next to it:
    the session id, then ``info`` as one JSON line, e.g. the rank's counts of runs done and failed)."""
    from ..io import atomic_write

    text = session if info is None else f"{session}\n{json.dumps(info)}"
    atomic_write(Path(str(path) + ".done"), text.encode())


def read_marker(path: str | os.PathLike) -> tuple[str, dict]:
    """``(session, info)`` of the completion marker of the shard at ``path`` (``OSError`` if absent)."""
    session, _, info = Path(str(path) + ".done").read_text().partition("\n")
    try:
        return session, (json.loads(info) if info.strip() else {})
    except ValueError:  # cannot happen with atomic writes; treat as not complete
        return "", {}


def wait_for_shards(out: str | os.PathLike, world: int, session: str, poll: float = 0.5,
                    timeout: float | None = None, name: str = "shard", ext: str = "npz") -> list[Path]:
    """The ``world`` shard paths, once every rank has marked its shard complete for ``session``.

    Polls small marker files rather than a collective barrier, so ranks may finish hours apart.
    """
    start = time.monotonic()
    paths = [shard_path(out, r, world, name, ext) for r in range(world)]
    while True:
        ready = 0
        for p in paths:
            try:
                ready += read_marker(p)[0] == session
            except OSError:
                pass
        if ready == world:
            return paths
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"shards of {out} not complete after {timeout:.0f} s")
        time.sleep(poll)

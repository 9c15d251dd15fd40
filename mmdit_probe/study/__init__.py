"""Studies over prompt sets: many recorded runs aggregated as they stream, with bootstrap intervals.

``mp.study(pipe, prompts, seeds=..., statistics=..., specs=...)`` → :class:`Study` (tables, differences,
word maps, figures). Runs split over processes with ``accelerate launch``; see ``docs/study.md``.

Modules: :mod:`.prompts` (prompt sets and files), :mod:`.settings` (what runs are recorded under),
:mod:`.extract` (one run → cell values), :mod:`.running` (exact streaming moments), :mod:`.state`
(blocks, per-prompt means), :mod:`.bootstrap`, :mod:`.shards` (ranks, shard files, resume, merge),
:mod:`.runner` (the ``study()`` loop), :mod:`.tables` (:class:`Study`), :mod:`.figures` (plots, imported lazily).
"""

from .bootstrap import bootstrap_mean
from .prompts import PromptFileError, generate_prompts, load_prompts, shipped_prompts
from .running import KeyIndex, RunningMoments
from .settings import Setting, without_t5
from .shards import ShardError
from .runner import study
from .tables import Study

__all__ = ["study", "Study", "Setting", "without_t5", "load_prompts", "shipped_prompts", "generate_prompts",
           "PromptFileError", "ShardError", "RunningMoments", "KeyIndex", "bootstrap_mean"]

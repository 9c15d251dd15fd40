"""Interactive explorer: one self-contained HTML page per results file or ablation sweep table.

>>> mp.explore(res, image=img)                    # inline in a notebook (``_repr_html_``)
>>> mp.explore(res, path="run.html")              # a file; prints its size
>>> mp.explore("out/sweep/sweep.csv", path="sweep.html")

The page embeds plotly.js (from the ``plotly`` package), its data and its script, so it opens offline.
Quadrant and group masses are always carried (small); word maps only for the words / layers / steps /
heads / branches asked for. A page over ``max_bytes`` is refused with an :class:`ExploreBudgetError`
that says how to narrow it. Command line: ``mmdit-probe explore RESULTS -o run.html``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .data import WordSelection, pick_branches, plan_words, result_data, word_data

__all__ = ["explore", "Explorer", "ExploreBudgetError", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 25_000_000
SWEEP_SUFFIXES = (".csv", ".parquet")


class ExploreBudgetError(ValueError):
    """The page would be larger than ``max_bytes``; the message says how to narrow it."""


def mb(n: float) -> str:
    """``1234567`` → ``"1.2 MB"`` (``"12 kB"`` below 1 MB)."""
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@dataclass
class Explorer:
    """An explorer page: ``html`` (self-contained), the ``data`` it carries, where it was saved (``path``).

    Shown inline in a notebook (an iframe holding the page); :meth:`save` writes it.
    """

    html: str
    data: dict
    title: str
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        """Size of the page in bytes (UTF-8)."""
        return len(self.html.encode("utf-8"))

    def sizes(self) -> dict[str, int]:
        """Bytes of the page and of its parts: plotly.js, the data (JSON), the embedded image."""
        from .page import data_json, plotly_js

        image = len((self.data.get("image") or {}).get("src", ""))
        return {"page": self.nbytes, "plotly.js": len(plotly_js()), "data": len(data_json(self.data).encode()) - image,
                "image": image}

    def size_text(self) -> str:
        """``"4.9 MB (plotly.js 4.8 MB, data 39 kB, image 5 kB)"``."""
        s = self.sizes()
        parts = ", ".join(f"{k} {mb(v)}" for k, v in s.items() if k != "page" and v)
        return f"{mb(s['page'])} ({parts})"

    def save(self, path: str | os.PathLike, quiet: bool = False) -> Path:
        """Write the page to ``path`` (folders created); prints its size unless ``quiet``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        self.path = path
        if not quiet:
            print(f"wrote {path}: {self.size_text()}")
        return path

    def _repr_html_(self) -> str:
        from .page import iframe

        return iframe(self.html, height=1500 if self.data["kind"] == "result" else 1100)

    def __repr__(self) -> str:
        where = f", saved to {self.path}" if self.path else ""
        return f"Explorer({self.data['kind']} page {self.title!r}, {mb(self.nbytes)}{where})"


def explore(source: Any, path: str | os.PathLike | None = None, *, image: Any = None,
            words: Sequence[str] | str | None = None, layers: Sequence[int] | int | None = None,
            steps: Sequence[int] | int | None = None, heads: Sequence[int] | int | str | None = None,
            branch: str | Sequence[str] | None = None, title: str | None = None,
            max_bytes: int | None = DEFAULT_MAX_BYTES, quiet: bool = False) -> Explorer:
    """The explorer page of ``source``: an ``AttentionResult``, a results file (``.safetensors``), a sweep
    DataFrame or a sweep table (``.csv`` / ``.parquet``). Written to ``path`` when given.

    Result pages: ``image`` (PIL image, array or file; default: the image recorded next to a results file)
    is drawn under the word maps. Word maps are carried for ``words`` (default all), single ``layers``
    (default all; ``[]``: only the mean over layers), ``steps`` (default all; the mean over steps always),
    ``heads`` (default none, head means only; ``"all"`` or a list for maps recorded with
    ``word_heads="all"``) and ``branch`` (default all). ``max_bytes`` (None: no limit) bounds the page.
    """
    from .page import render

    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in SWEEP_SUFFIXES:
        from .sweep_data import read_sweep

        title = title or f"Ablation sweep: {Path(source).name}"
        source = read_sweep(source)
    if hasattr(source, "columns") and hasattr(source, "groupby"):  # a DataFrame: a sweep table
        given = [k for k, v in dict(image=image, words=words, layers=layers, steps=steps, heads=heads,
                                    branch=branch).items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} select what a results page shows; a sweep page takes none of them")
        from .sweep_data import sweep_data

        data = sweep_data(source)
        page = Explorer(render(data, title or "Ablation sweep", _footer(data)), data, title or "Ablation sweep")
    else:
        page = _result_page(source, image, words, layers, steps, heads, branch, title, max_bytes)
    if max_bytes is not None and page.nbytes > max_bytes:
        raise ExploreBudgetError(f"the explorer page is {mb(page.nbytes)}, over the budget of {mb(max_bytes)}: "
                                 "narrow the input (fewer words, steps, layers, metrics or ablations) or raise "
                                 "max_bytes (--max-mb)")
    if path is not None:
        page.save(path, quiet=quiet)
    return page


def _result_page(source: Any, image: Any, words: Any, layers: Any, steps: Any, heads: Any, branch: Any,
                 title: str | None, max_bytes: int | None) -> Explorer:
    from ..result import AttentionResult
    from .page import image_source, render

    if isinstance(source, (str, os.PathLike)):
        file = Path(source)
        source = AttentionResult.load(file)
        recorded = source.meta.get("run", {}).get("image")
        if image is None and recorded and (file.parent / recorded).is_file():
            image = file.parent / recorded
    if not isinstance(source, AttentionResult):
        raise TypeError(f"explore() takes an AttentionResult, a results file, a sweep DataFrame or a sweep table "
                        f"(.csv/.parquet), not {type(source).__name__}")
    branches = pick_branches(source, branch)
    sel = plan_words(source, words, layers, steps, heads, branches)
    data = result_data(source, sel, branches, maps=False)
    data["image"] = image_source(image) if image is not None else None
    title = title or " · ".join(str(x) for x in (source.meta.get("model"), data["info"]["prompt"]) if x)
    title = title or "mmdit_probe explorer"
    if max_bytes is not None:  # the page without word maps, measured, plus the maps' exact base64 size
        fixed = len(render(data, title, _footer(data)).encode("utf-8"))
        if fixed + (sel.nbytes if sel else 0) > max_bytes:
            raise ExploreBudgetError(_refusal(fixed, sel, max_bytes))
    if sel is not None:
        data["word_maps"] = word_data(source, sel)
    return Explorer(render(data, title, _footer(data)), data, title)


def _refusal(fixed: int, sel: WordSelection | None, max_bytes: int) -> str:
    """Why the page is refused and how to narrow it, with a narrowing that fits when there is one."""
    words = sel.nbytes if sel else 0
    msg = (f"the explorer page would be about {mb(fixed + words)}, over the budget of {mb(max_bytes)} "
           f"(max_bytes / --max-mb): plotly.js, the masses and the image take {mb(fixed)}")
    if not sel or fixed > max_bytes:
        return msg + (". Even without word maps the page needs that much: raise the budget" if fixed > max_bytes
                      else "") + "."
    msg += (f", the word maps {mb(words)} ({sel.describe()}). Narrow the word maps: fewer words (words=[...] / "
            "--words), steps (steps=[0, 10, 20] / --steps 0,10,20), layers (layers=[] keeps only the mean over "
            "layers / --layers mean), one branch (branch='cond' / --branch cond); or raise the budget.")
    tries = [("layers=[]", "--layers mean", dataclasses.replace(sel, layers=()))]
    if len(sel.branches) > 1:
        tries.append((tries[-1][0] + ", branch='cond'", tries[-1][1] + " --branch cond",
                      dataclasses.replace(tries[-1][2], branches=sel.branches[:1])))
    for n in (10, 5, 1):
        if len(sel.steps) > n:
            keep = sel.steps[:: -(-len(sel.steps) // n)]
            s = ",".join(map(str, keep))
            tries.append((tries[-1][0] + f", steps=[{s.replace(',', ', ')}]", tries[-1][1] + f" --steps {s}",
                          dataclasses.replace(tries[-1][2], steps=keep)))
    for py, cli, narrowed in tries:
        if fixed + narrowed.nbytes <= max_bytes:
            return msg + f" For example {py} ({cli}) gives about {mb(fixed + narrowed.nbytes)}."
    return msg


def _footer(data: dict) -> str:
    from .. import __version__
    from .page import data_json

    return f"mmdit_probe {__version__} explorer · data {mb(len(data_json(data).encode()))} · drawn with plotly.js"

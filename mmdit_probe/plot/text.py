"""Text measuring and wrapping in points, so labels and titles can be fitted before drawing."""

from __future__ import annotations

import re
from functools import lru_cache

from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

LINE_SPACING = 1.2  # matplotlib's default line spacing, as a multiple of the font size
_TO_PATH = TextToPath()


@lru_cache(maxsize=4096)
def line_width_pt(line: str, fontsize: float) -> float:
    """Width in points of one line of text in the default font."""
    if not line:
        return 0.0
    w, _, _ = _TO_PATH.get_text_width_height_descent(line, FontProperties(size=fontsize), ismath=False)
    return float(w)


def text_size_pt(text: str, fontsize: float) -> tuple[float, float]:
    """``(width, height)`` in points of (possibly multi-line) ``text``."""
    lines = str(text).split("\n")
    return max(line_width_pt(l, fontsize) for l in lines), len(lines) * fontsize * LINE_SPACING


def _break_word(word: str, width: float, fontsize: float) -> list[str]:
    """Split one over-long word into pieces no wider than ``width``."""
    pieces, cur = [], ""
    for ch in word:
        if cur and line_width_pt(cur + ch, fontsize) > width:
            pieces.append(cur)
            cur = ch
        else:
            cur += ch
    return pieces + [cur] if cur else pieces


def _tokens(para: str) -> list[str]:
    """Pieces of a line that may end a wrapped line: words, and code-like text split after , ( / _."""
    return [t for t in re.findall(r"[^ ,(/_]*[ ,(/_]?", para) if t]


def wrap_text(text: str, width_pt: float, fontsize: float, max_lines: int | None = None) -> str:
    """``text`` re-broken at spaces (and after , ( / _ in code-like labels) so no line is wider
    than ``width_pt``; over-long words are split; kept newlines stay. Past ``max_lines`` the last
    kept line ends in "…"."""
    out: list[str] = []
    for para in str(text).split("\n"):
        cur = ""
        for tok in _tokens(para):
            if line_width_pt((cur + tok).rstrip(), fontsize) <= width_pt:
                cur += tok
                continue
            if cur.strip():
                out.append(cur.rstrip())
            word = tok.rstrip()
            pieces = _break_word(word, width_pt, fontsize) if line_width_pt(word, fontsize) > width_pt else [tok]
            out.extend(pieces[:-1])
            cur = pieces[-1] if pieces else ""
        out.append(cur.rstrip())
    if max_lines is not None and len(out) > max_lines:
        last = out[max_lines - 1]
        while last and line_width_pt(last + "…", fontsize) > width_pt:
            last = last[:-1]
        out = out[: max_lines - 1] + [last.rstrip() + "…"]
    return "\n".join(out)


def shorten(label: str, n: int = 28) -> str:
    """``label`` cut to ``n`` characters with "…" in the middle, keeping both ends (where specs differ)."""
    if len(label) <= n:
        return label
    head = (n - 1) // 2
    return label[:head] + "…" + label[len(label) - (n - 1 - head):]

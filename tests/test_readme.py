"""Every example of README.md runs as written: the ```python blocks, the first screen's commands and the
command-line examples. The blocks are read from README.md itself, never copied here.

Rules (also what a reader of the README may rely on):

* **Sections.** A section is everything under one ``## `` heading (its ``###`` subsections included). The
  ```python blocks of a section run top to bottom in one shared namespace, in a fresh temporary working
  folder; every section starts from an empty namespace. So a block may use names defined by an earlier block
  of its own section, never by another section.
* **Skips.** A block whose first line is a ``# needs: ...`` comment (e.g. ``# needs: weights, GPU``) needs real
  model weights or an accelerator; it is skipped, with that line as the reason. Everything else must run
  offline, on CPU, on the embedded models (``mp.default_pipeline()``, ``mp.tiny_sd3_pipeline()``).
* **First screen.** The ```bash block before the first ``##`` heading holds exactly two commands: set-up +
  demo, and the test command. The test command is not run here (it runs this suite: recursion); it must be
  the command ``.ci/run`` runs. ``scripts/test.sh`` runs ``scripts/setup.sh`` right before pytest, so under
  the README's test command the set-up has just run; here the part after ``bash scripts/setup.sh &&`` is run
  verbatim, in a temporary folder whose ``.venv`` is this checkout's venv.
* **Shell blocks** of the sections run as one bash script (``set -euxo pipefail``) in a temporary folder, with
  the venv's ``bin`` first on PATH — what ``source .venv/bin/activate`` does, as the README says.
* **Claims.** A few results the README states in words are checked too (``CLAIMS``): the values named
  there must exist in the section's namespace.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP_MARKER = re.compile(r"^#\s*needs:\s*(.+)$")
TEST_COMMAND = "bash scripts/test.sh"
SETUP_COMMAND = "bash scripts/setup.sh"


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    source: str
    line: int  # 1-based line of the opening fence in README.md

    @property
    def needs(self) -> str | None:
        first = self.source.strip().splitlines()[0].strip() if self.source.strip() else ""
        m = SKIP_MARKER.match(first)
        return m.group(1).strip() if m else None


def readme_blocks(text: str | None = None) -> list[Block]:
    """All fenced code blocks of README.md with their ``##`` section ("" before the first heading)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks, section, fence, buf, start = [], "", None, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        if fence is None:
            m = re.match(r"^```([\w+-]*)\s*$", line)
            if m:
                fence, buf, start = m.group(1).lower(), [], i
            elif line.startswith("## "):
                section = line[3:].strip()
        elif line.rstrip() == "```":
            blocks.append(Block(section, fence, "\n".join(buf) + "\n", start))
            fence = None
        else:
            buf.append(line)
    assert fence is None, f"README.md: code block opened at line {start} is never closed"
    return blocks


BLOCKS = readme_blocks()
PY_SECTIONS: dict[str, list[Block]] = {}
for _b in BLOCKS:
    if _b.lang == "python":
        PY_SECTIONS.setdefault(_b.section, []).append(_b)
SH_BLOCKS = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console") and b.section]
FIRST_SCREEN = [b for b in BLOCKS if b.section == "" and b.lang in ("bash", "sh", "shell")]


def venv_bin() -> Path:
    """The venv's bin folder the README tells users to put on PATH (``.venv/bin``); else this interpreter's."""
    for cand in (ROOT / ".venv" / "bin", Path(sys.executable).parent):
        if (cand / "mmdit-probe").exists():
            return cand
    pytest.fail("no `mmdit-probe` next to .venv/bin/python or this interpreter: run `bash scripts/setup.sh`")


def shell_env() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = venv_bin()
    env.update(PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]), VIRTUAL_ENV=str(bin_dir.parent),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
    return env


def commands(source: str) -> list[str]:
    """Shell commands of a block: comment-only lines dropped, backslash continuations joined."""
    out, cur = [], ""
    for line in source.splitlines():
        if not cur and (not line.strip() or line.strip().startswith("#")):
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        out.append(cur.strip())
        cur = ""
    return out


def strip_comment(cmd: str) -> str:
    """``cmd`` without a trailing ``# comment`` (shlex-aware, so '#' inside quotes stays)."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return " ".join(shlex.quote(t) if not re.fullmatch(r"[&|;<>]+", t) else t for t in lex)


# ---- claims stated in words next to a block: section -> check(namespace of the section) -----------------

def _key_groups_sum_to_one(ns):
    sums = ns["mass"].groupby(["layer", "query"]).sum()
    assert ((sums - 1).abs() < 1e-4).all(), f"the two key groups of each query group should sum to 1:\n{sums}"


def _lora_counts_prints_peft_line(ns):
    counts = ns["counts"]
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", str(counts)), str(counts)
    assert counts.total > 0 and 0 <= counts.trainable <= counts.total


def _patched_comes_out_red(ns):
    """'a blue square' patched with the image stream of 'a red circle' 'comes out red, not blue'."""
    import numpy as np

    img = np.asarray(ns["patched"].convert("RGB"), dtype=np.float32) / 255
    obj = img[img.max(-1) > 0.5]  # object pixels (the background is black)
    pure = np.array([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)], np.float32)  # red, green, blue, yellow
    nearest = np.linalg.norm(obj[:, None] - pure, axis=-1).argmin(-1)
    red, blue = (nearest == 0).mean(), (nearest == 2).mean()
    assert len(obj) and red > 0.5 > blue, f"patched image: red share {red:.2f}, blue share {blue:.2f} of {len(obj)} px"


CLAIMS = {
    "What it records": _key_groups_sum_to_one,
    "SD3 anatomy: inspect, compare, step counts": _lora_counts_prints_peft_line,
    "Ablations and interventions": _patched_comes_out_red,
}


# ---- the tests ---------------------------------------------------------------------------------------------

def test_readme_has_examples():
    """Guard against the parser silently finding nothing."""
    assert len(PY_SECTIONS) >= 5 and sum(map(len, PY_SECTIONS.values())) >= 8, sorted(PY_SECTIONS)
    assert SH_BLOCKS and FIRST_SCREEN
    for section in CLAIMS:
        assert section in PY_SECTIONS, f"CLAIMS names a section README.md no longer has: {section!r}"
    for b in BLOCKS:
        if b.needs:
            assert b.lang in ("python", "bash"), b


@pytest.mark.slow
@pytest.mark.parametrize("section", list(PY_SECTIONS), ids=list(PY_SECTIONS))
def test_python_section_runs(section, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ns: dict = {"__name__": "__readme__"}
    ran, skipped = 0, []
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # the examples seed torch's global RNG; leave other tests' alone
            for block in PY_SECTIONS[section]:
                if block.needs:
                    skipped.append(f"README.md:{block.line} needs {block.needs}")
                    continue
                start = time.monotonic()
                code = compile(block.source, f"README.md:{block.line} ({section})", "exec")
                exec(code, ns)  # noqa: S102 - running the documentation is the point
                print(f"README.md:{block.line}: {time.monotonic() - start:.1f} s")
                ran += 1
    finally:
        plt.close("all")
        torch.set_num_threads(threads)
    if not ran:
        pytest.skip("; ".join(skipped))
    if section in CLAIMS:
        CLAIMS[section](ns)


def test_first_screen_test_command_is_ci():
    """The README's test command is exactly what CI runs; it is not run here (it runs this suite)."""
    assert len(FIRST_SCREEN) == 1, "the first screen should have one ```bash block"
    cmds = [strip_comment(c) for c in commands(FIRST_SCREEN[0].source)]
    assert len(cmds) == 2, f"the first screen should hold two commands (set-up + demo, tests): {cmds}"
    assert cmds[1] == TEST_COMMAND, cmds
    ci = [c for c in commands((ROOT / ".ci" / "run").read_text()) if not c.startswith(("set ", "cd "))]
    assert ci[-1:] == [TEST_COMMAND] and all(c.startswith("bash scripts/") for c in ci[:-1]), (
        f".ci/run should run the README's test command `{TEST_COMMAND}` (after set-up scripts only), runs {ci}")
    test_sh = [c for c in commands((ROOT / "scripts" / "test.sh").read_text())]
    assert SETUP_COMMAND in test_sh, "scripts/test.sh should run scripts/setup.sh before the tests"
    assert test_sh.index(SETUP_COMMAND) < next(i for i, c in enumerate(test_sh) if "pytest" in c)


@pytest.mark.slow
def test_first_screen_demo_runs(tmp_path):
    cmd = strip_comment(commands(FIRST_SCREEN[0].source)[0])
    setup, sep, rest = cmd.partition(" && ")
    assert setup == SETUP_COMMAND and sep, f"the first command should be `{SETUP_COMMAND} && <demo>`: {cmd}"
    # scripts/test.sh has just run scripts/setup.sh (test_first_screen_test_command_is_ci); run the rest verbatim
    # where `.venv` is this checkout's venv.
    (tmp_path / ".venv").symlink_to(venv_bin().parent, target_is_directory=True)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", rest], cwd=tmp_path, env=shell_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"`{rest}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = tmp_path / "out" / "demo"
    made = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    for ext in (".csv", ".png", ".safetensors"):  # "table, figures, results file"
        assert any(n.endswith(ext) for n in made), f"demo wrote no {ext} into out/demo/: {made}"


@pytest.mark.slow
@pytest.mark.parametrize("block", SH_BLOCKS, ids=[f"{b.section}:L{b.line}" for b in SH_BLOCKS])
def test_shell_block_runs(block, tmp_path):
    if block.needs:
        pytest.skip(f"README.md:{block.line} needs {block.needs}")
    script = "set -euxo pipefail\n" + block.source
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=shell_env(), capture_output=True, text=True,
                          timeout=600)
    print(f"README.md:{block.line}: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, (f"README.md:{block.line} ({block.section}) failed:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")

"""``accelerate launch --num_processes 2 -m mmdit_probe sweep`` (CPU, gloo): the merged table equals a
one-process sweep byte for byte, the runs are split between the ranks, and a rank killed with SIGKILL
resumes without redoing the runs its shard holds."""

import importlib
import json
import subprocess
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from launching import env, kill_rank1_midway, launch, read_log

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square"]
# tiny SD3 (4 blocks): 4 skip-layer specs x 2 prompts x 2 seeds = 16 runs, 8 per rank
ARGS = ["sweep", "--model", "tiny", "--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "12",
        "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seeds", "0", "1", "--no-figures", "--no-progress"]
SPECS = [f"skip block {i}" for i in range(4)]
ALL = {(p, s, spec) for p in PROMPTS for s in (0, 1) for spec in SPECS}

DRIVER = textwrap.dedent('''
    """Test driver: ``mmdit-probe``, optionally logging every ablated run and every table write, slowed down."""
    import importlib, json, os, sys, time

    import torch

    torch.set_num_threads(1)
    log_dir, slow = os.environ.get("SWEEP_LOG"), float(os.environ.get("SWEEP_SLOW", "0"))
    if log_dir:
        sw = importlib.import_module("mmdit_probe.sweep")  # (mmdit_probe.sweep is also the function)

        rank = os.environ.get("RANK", "0")

        def log(kind, value):
            with open(os.path.join(log_dir, f"rank{rank}.log"), "a") as fh:
                fh.write(kind + "\\t" + json.dumps(value) + "\\n")

        log("pid", os.getpid())
        run_pipeline, save = sw.run_pipeline, sw._save

        def logged_run(pipe, prompt, seed, specs, **kw):
            out = run_pipeline(pipe, prompt, seed, specs, **kw)
            if specs:
                time.sleep(slow)
                log("ran", [prompt, seed, " + ".join(s.describe() for s in specs)])
            return out

        def logged_save(path, rows, order):
            save(path, rows, order)
            log("persisted", sorted({(r["prompt"], r["seed"], r["spec"]) for r in rows}))

        sw.run_pipeline, sw._save = logged_run, logged_save

    from mmdit_probe.cli import main

    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "sweep_driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The sweep on one process, in this process (one torch thread, as the launched ranks)."""
    from mmdit_probe.cli import main

    out = tmp_path_factory.mktemp("one") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not (out / "shards").exists()
    return out


def _runs(table: Path) -> set[tuple]:
    df = pd.read_csv(table)
    return set(zip(df["prompt"], df["seed"].astype(int), df["spec"]))


def _same_sweep(a: Path, b: Path) -> None:
    assert (a / "sweep.csv").read_bytes() == (b / "sweep.csv").read_bytes()
    sa, sb = (json.loads((p / "sweep.settings.json").read_text()) for p in (a, b))
    assert sa == sb and sa["transformer_calls"] == 2


def test_two_processes_equal_one(driver, reference, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([*launch(2), "-m", "mmdit_probe", *ARGS, "--out", str(out)], capture_output=True, text=True,
                       env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16 run now, 0 skipped (finished before), 0 failed" in r.stdout
    _same_sweep(reference, out)
    shards = sorted((out / "shards").glob("*.csv"))
    assert [p.name for p in shards] == ["sweep-000-of-002.csv", "sweep-001-of-002.csv"]
    parts = [_runs(p) for p in shards]
    assert len(parts[0]) == len(parts[1]) == 8 and parts[0] | parts[1] == ALL  # split, disjoint, complete
    assert _runs(reference / "sweep.csv") == ALL


def test_kill_one_rank_then_resume(driver, reference, tmp_path, monkeypatch):
    out, logs1, logs2 = tmp_path / "out", tmp_path / "log1", tmp_path / "log2"
    logs1.mkdir()
    logs2.mkdir()
    kill_rank1_midway([*launch(2), str(driver), *ARGS, "--out", str(out)],
                      env(SWEEP_LOG=str(logs1), SWEEP_SLOW="0.4"), logs1)
    assert not (out / "sweep.csv").exists()  # nothing merged

    # what the shards on disk hold is what counts as finished (each rank's last complete atomic write)
    held = [_runs(out / "shards" / f"sweep-00{rank}-of-002.csv") for rank in (0, 1)]
    finished = held[0] | held[1]
    assert 3 <= len(held[1]) < 8, held[1]
    for rank in (0, 1):  # every write the driver saw complete is in the shard
        writes = [v for k, v in read_log(logs1 / f"rank{rank}.log") if k == "persisted"]
        assert writes and {tuple(u) for u in writes[-1]} <= held[rank]

    r = subprocess.run([*launch(2), str(driver), *ARGS, "--out", str(out), "--resume"], capture_output=True,
                       text=True, env=env(SWEEP_LOG=str(logs2)), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ran_again = [tuple(v) for rank in (0, 1) for k, v in read_log(logs2 / f"rank{rank}.log") if k == "ran"]
    assert len(ran_again) == len(set(ran_again))
    assert not set(ran_again) & finished  # nothing finished before is redone
    assert set(ran_again) | finished == ALL
    assert f"{len(ran_again)} run now, {len(finished)} skipped (finished before), 0 failed" in r.stdout
    _same_sweep(reference, out)

    # a later resume on ONE process finds everything finished (in the merged table and the shards): no run
    from mmdit_probe.cli import main

    sw = importlib.import_module("mmdit_probe.sweep")

    calls = []
    monkeypatch.setattr(sw, "run_pipeline", lambda *a, **k: calls.append(a) or 1 / 0)
    (out / "sweep.csv").unlink()  # the shards alone hold every run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not calls
    _same_sweep(reference, out)

"""``accelerate launch --num_processes 2 -m mmdit_probe sweep`` (CPU, gloo): the merged table equals a
one-process sweep byte for byte, the runs are split between the ranks, and a rank killed with SIGKILL
resumes without redoing the runs its shard holds."""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

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


def _env(**extra):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int) -> list[str]:
    """``accelerate launch`` on ``n`` CPU processes (``--multi_gpu`` + ``ACCELERATE_USE_CPU=1``: gloo; ``--cpu``
    alone would start one process)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port())]


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
    r = subprocess.run([*_launch(2), "-m", "mmdit_probe", *ARGS, "--out", str(out)], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16 run now, 0 skipped (finished before), 0 failed" in r.stdout
    _same_sweep(reference, out)
    shards = sorted((out / "shards").glob("*.csv"))
    assert [p.name for p in shards] == ["sweep-000-of-002.csv", "sweep-001-of-002.csv"]
    parts = [_runs(p) for p in shards]
    assert len(parts[0]) == len(parts[1]) == 8 and parts[0] | parts[1] == ALL  # split, disjoint, complete
    assert _runs(reference / "sweep.csv") == ALL


def _read_log(path: Path) -> list[tuple[str, object]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, _, value = line.partition("\t")
        try:
            out.append((kind, json.loads(value)))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def test_kill_one_rank_then_resume(driver, reference, tmp_path, monkeypatch):
    out, logs1, logs2 = tmp_path / "out", tmp_path / "log1", tmp_path / "log2"
    logs1.mkdir()
    logs2.mkdir()
    proc = subprocess.Popen([*_launch(2), str(driver), *ARGS, "--out", str(out)],
                            env=_env(SWEEP_LOG=str(logs1), SWEEP_SLOW="0.4"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            events = _read_log(logs1 / "rank1.log")
            pid = next((v for k, v in events if k == "pid"), None)
            persisted = [v for k, v in events if k == "persisted"]
            if pid and persisted and len(persisted[-1]) >= 3:
                os.kill(pid, signal.SIGKILL)  # kill -9 of rank 1, mid-way through its 8 runs
                killed = pid
                break
            time.sleep(0.02)
        assert killed, "rank 1 never got to 3 saved runs, or the launch ended first"
        output = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, output[-2000:]
    assert not (out / "sweep.csv").exists()  # nothing merged

    # what the shards on disk hold is what counts as finished (each rank's last complete atomic write)
    held = [_runs(out / "shards" / f"sweep-00{rank}-of-002.csv") for rank in (0, 1)]
    finished = held[0] | held[1]
    assert 3 <= len(held[1]) < 8, held[1]
    for rank in (0, 1):  # every write the driver saw complete is in the shard
        writes = [v for k, v in _read_log(logs1 / f"rank{rank}.log") if k == "persisted"]
        assert writes and {tuple(u) for u in writes[-1]} <= held[rank]

    r = subprocess.run([*_launch(2), str(driver), *ARGS, "--out", str(out), "--resume"], capture_output=True,
                       text=True, env=_env(SWEEP_LOG=str(logs2)), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ran_again = [tuple(v) for rank in (0, 1) for k, v in _read_log(logs2 / f"rank{rank}.log") if k == "ran"]
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

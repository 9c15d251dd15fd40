"""Running ``accelerate launch`` on CPU processes from the tests (the study's and the sweep's multi-process tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    """This process's environment for launched ranks: offline, one thread each, CPU (gloo), the repo importable."""
    out = dict(os.environ)
    out.update({"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")})
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        out.pop(k, None)
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int) -> list[str]:
    """``accelerate launch`` on ``n`` CPU processes (``--multi_gpu`` + ``ACCELERATE_USE_CPU=1``: gloo; ``--cpu``
    alone would start one process)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def read_log(path: Path) -> list[tuple[str, object]]:
    """``(kind, value)`` lines a rank wrote (tab-separated, JSON values); a line being written is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, _, value = line.partition("\t")
        try:
            out.append((kind, json.loads(value)))
        except json.JSONDecodeError:
            pass
    return out


def kill_rank1_midway(cmd: list[str], environment: dict[str, str], log_dir: Path, *, after: int = 3) -> str:
    """Run ``cmd`` (a 2-process launch whose ranks log ``pid`` and ``persisted`` to ``log_dir/rank<r>.log``), send
    ``kill -9`` to rank 1 once it has persisted ``after`` runs, and return the launch's output (it must fail)."""
    proc = subprocess.Popen(cmd, env=environment, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            events = read_log(log_dir / "rank1.log")
            pid = next((v for k, v in events if k == "pid"), None)
            persisted = [v for k, v in events if k == "persisted"]
            if pid and persisted and len(persisted[-1]) >= after:
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
            time.sleep(0.02)
        assert killed, f"rank 1 never got to {after} saved runs, or the launch ended first"
        output = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, output[-2000:]
    return output

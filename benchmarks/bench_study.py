"""Benchmark: ``mmdit_probe.study`` throughput and memory against the number of prompts.

    python benchmarks/bench_study.py                          # default model + its run kwargs, 8 vs 32 prompts
    python benchmarks/bench_study.py --sizes 8 32 64 --steps 4 --device cuda
    python benchmarks/bench_study.py --sizes 8 200 --merge    # add sizes to the results file, keep the others

Each size runs in a fresh process (so peak memory is that size's alone): the embedded default model
(``mp.default_pipeline()``, ``mp.default_run_kwargs(pipe)`` unless ``--steps``), the first N prompts of the
shipped set, one seed, statistics mass + group_mass + word_map, after one untimed warm-up run. Reports

* runs per minute (wall time of the study, model loading excluded) and the aggregation's share: ms per run
  spent outside the pipeline call and reading its result (streaming updates, bookkeeping, the final merge);
* peak RSS above the RSS before the study (sampled every 2 ms) and the tracemalloc peak (Python and
  numpy allocations: the aggregation; torch's allocator is not traced), and, on CUDA, max allocated;
* the aggregated state: bytes of the streaming moments (per cell: flat in prompts) and of the per-prompt
  means kept for the bootstrap (``O(prompts × interval cells)``, small numbers).

Prints a table and writes JSON to ``benchmarks/results/study-<model>-<device>.json`` (``--merge``: the sizes
measured now replace those in the file, the others are kept). Each row also records the 1-minute load
average before and after its study (``os.getloadavg``): on a shared machine runs/min falls with the load;
the memory figures do not depend on it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest RSS seen by a 2 ms sampling thread while active."""

    def __init__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def child(args: argparse.Namespace) -> dict:
    import torch

    import mmdit_probe as mp
    from mmdit_probe.study import shipped_prompts, study

    pipe = mp.default_pipeline()
    if args.device:
        pipe = pipe.to(args.device)
    kw = mp.default_run_kwargs(pipe)
    if args.steps:
        kw["num_inference_steps"] = args.steps
    prompts = shipped_prompts().head(args.prompts)
    runner = importlib.import_module("mmdit_probe.study.runner")
    inner, in_runs = runner.run_unit, [0.0]

    def timed_run(*a, **k):  # the pipeline call and reading its result; the rest of the study is aggregation
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            in_runs[0] += time.perf_counter() - t

    runner.run_unit = timed_run
    study(pipe, prompts.head(1), progress=False, **kw)  # warm-up, untimed
    in_runs[0] = 0.0
    cuda = str(args.device or "").startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    base = _rss()
    tracemalloc.start()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = study(pipe, prompts, seeds=[0], progress=False, **kw)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    arrays = res.state.to_arrays()
    per_prompt = sum(v.nbytes for k, v in arrays.items() if k.endswith((".sums", ".counts", ".prompts")))
    streaming = sum(v.nbytes for k, v in arrays.items() if ".m." in k or ".key." in k)
    runs = res.report["done"]
    return {
        "prompts": args.prompts, "runs": runs, "seconds": elapsed, "runs_per_minute": 60.0 * runs / elapsed,
        "aggregation_ms_per_run": 1000.0 * (elapsed - in_runs[0]) / runs,
        "peak_rss_above_start_mib": (rss.peak - base) / 2**20, "tracemalloc_peak_mib": traced / 2**20,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "streaming_state_mib": streaming / 2**20, "per_prompt_state_mib": per_prompt / 2**20,
        "blocks": len(res.state.blocks), "words": len(res.words),
        "cells": int(sum(len(b.full) for b in res.state.blocks.values())),
        "run_kwargs": kw, "torch_threads": torch.get_num_threads(), "device": str(args.device or "cpu"),
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="numbers of prompts to compare")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's run kwargs)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/study-default-<device>.json)")
    p.add_argument("--merge", action="store_true", help="keep the other sizes already in the results file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", "--prompts", str(n)]
        cmd += ["--steps", str(args.steps)] if args.steps else []
        cmd += ["--device", args.device] if args.device else []
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
        if r.returncode or line is None:
            sys.exit(f"size {n} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"{n} prompts done: {rows[-1]['runs_per_minute']:.1f} runs/min", file=sys.stderr)
    head = (f"{'prompts':>8} {'runs':>5} {'runs/min':>9} {'agg ms/run':>11} {'peak RSS+ MiB':>14} {'tracemalloc MiB':>16} "
            f"{'streaming MiB':>14} {'per-prompt MiB':>15} {'blocks':>7} {'cells':>8}")
    print(head)
    for r in rows:
        print(f"{r['prompts']:>8} {r['runs']:>5} {r['runs_per_minute']:>9.2f} {r['aggregation_ms_per_run']:>11.1f} "
              f"{r['peak_rss_above_start_mib']:>14.1f} "
              f"{r['tracemalloc_peak_mib']:>16.2f} {r['streaming_state_mib']:>14.3f} {r['per_prompt_state_mib']:>15.3f} "
              f"{r['blocks']:>7} {r['cells']:>8}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"study-default-{rows[0]['device'].split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        new = {r["prompts"] for r in rows}
        rows = sorted([r for r in json.loads(out.read_text())["results"] if r["prompts"] not in new] + rows,
                      key=lambda r: r["prompts"])
    out.write_text(json.dumps({"sizes": [r["prompts"] for r in rows], "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

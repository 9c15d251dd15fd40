"""Shapes-world grounding of prompt-word maps and concept maps, on generated and on real (ground-truth) scenes.

    python scripts/concept_eval.py [--n 32] [--sigmas 0.3 0.6 0.9] [--out benchmarks/results/concept-eval.json]

Prints markdown tables (pointing accuracy / top-k IoU per map kind, source and layer) and writes the report as
JSON. Definitions: :mod:`mmdit_probe.analyse.shapes_eval` and :mod:`mmdit_probe.analyse.grounding`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="scenes (each is generated and analysed as a real image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and the noise")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the generated scenes")
    p.add_argument("--batch", type=int, default=16, help="captions per pipeline call")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 0.6, 0.9], help="noise levels of the real scenes")
    p.add_argument("--no-concepts", action="store_true", help="prompt-word maps only")
    p.add_argument("--no-empty-prompt", action="store_true", help="skip reading real scenes with the empty prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "concept-eval.json"), help="JSON report")
    a = p.parse_args(argv)
    if a.n < 1 or a.steps < 1 or a.batch < 1 or a.threads < 1:
        p.error("--n, --steps, --batch and --threads must be positive")
    if not all(math.isfinite(s) and 0 <= s <= 1 for s in a.sigmas):
        p.error(f"--sigmas must lie in [0, 1], got {a.sigmas}")
    out = Path(a.out)
    if out.is_dir():
        p.error(f"--out {a.out} is a folder; give a .json file")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    import torch

    import mmdit_probe as mp
    from mmdit_probe.analyse.shapes_eval import CONCEPTS, ConceptEvalConfig, evaluate_concepts, format_tables

    torch.set_num_threads(a.threads)
    pipe = mp.default_pipeline()
    if not hasattr(pipe, "shapes_config"):
        sys.exit("the shapes model's weights are not in this checkout (mmdit_probe/assets/shapes); nothing to evaluate")
    cfg = ConceptEvalConfig(n=a.n, seed=a.seed, steps=a.steps, batch=a.batch, sigmas=tuple(a.sigmas),
                            concepts=None if a.no_concepts else CONCEPTS, empty_prompt=not a.no_empty_prompt)
    report = evaluate_concepts(pipe, cfg, log=lambda m: print(m, flush=True))
    report["torch_threads"] = torch.get_num_threads()
    print(format_tables(report))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

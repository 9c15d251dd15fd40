"""When is a shape decided? Noise ground-truth scenes to a level σ, let the pipeline's own sampler
finish the trajectory from there, and check the result against the caption.

``mmdit-probe recover-shapes [--n N] [--steps S] [--split train|heldout] [--weights DIR] [--out FILE.json]``

A model that restores the prompted shapes from σ = 0.7 but not from pure noise fails in the
high-noise part of the trajectory, where layout and shape are chosen (this is how v2's blobs were
traced to its training σ distribution, see docs/shapes.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .evaluate import adherence, sampling_defaults
from .train import images_tensor
from .world import make_batch

__all__ = ["RecoveryConfig", "unshift_sigmas", "noised_latents", "recovery", "format_recovery", "recovery_main"]


@dataclass(frozen=True)
class RecoveryConfig:
    """Scenes (``split`` of the world, seeded), the sampler and the start levels to try."""

    n: int = 48
    steps: int = 20
    guidance: float | None = None  # None: the model's trained default
    seed: int = 0
    split: str = "train"  # "train": training captions (new scenes); "heldout": never-trained captions
    starts: tuple[float, ...] = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3)


def unshift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of the scheduler's ``shift·σ / (1 + (shift − 1)·σ)``: the values to pass as ``sigmas=``
    so that the scheduler, which shifts them again, runs exactly ``sigmas``."""
    return sigmas / (shift - (shift - 1) * sigmas)


@torch.no_grad()
def noised_latents(pipe, images: np.ndarray, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``(1 − σ)·x0 + σ·noise`` for the VAE posterior means of ``images`` (``[N, H, W, 3]`` in 0…1),
    in the transformer's normalised latent space (shift and scaling factor applied)."""
    vae = pipe.vae
    x = images_tensor(images).to(vae.device, vae.dtype)
    x0 = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return (1 - sigma) * x0 + sigma * noise


def recovery(pipe, cfg: RecoveryConfig = RecoveryConfig(), *, log=print) -> dict:
    """Per start level: the σ actually used (the first step of the ``cfg.steps`` schedule at or below
    the requested one), how many steps remain, and the adherence of the finished images."""
    batch = make_batch(cfg.n, 2_000_000 + cfg.seed, split=cfg.split)
    guidance, max_len = sampling_defaults(pipe, cfg.guidance)
    pipe.scheduler.set_timesteps(cfg.steps)
    schedule = pipe.scheduler.sigmas[:-1].clone()  # the default trajectory (shifted), without the final 0
    shift = float(pipe.scheduler.config.shift)
    rows = []
    for start in cfg.starts:
        k = min(int((schedule > start + 1e-6).sum()), len(schedule) - 1)  # the schedule decreases
        sigma = float(schedule[k])
        latents = noised_latents(pipe, batch.images, sigma, torch.Generator().manual_seed(cfg.seed))
        out = pipe(batch.captions, latents=latents, sigmas=unshift_sigmas(schedule[k:], shift).tolist(),
                   guidance_scale=guidance, max_sequence_length=max_len, output_type="np").images
        row = {"start": start, "sigma": round(sigma, 4), "steps_left": len(schedule) - k,
               **adherence(np.asarray(out, np.float32), batch.captions)}
        log(f"from sigma {row['sigma']:.3f} ({row['steps_left']} steps): colour+shape {row['shape']:.2f} all {row['all']:.2f}")
        rows.append(row)
    return {"config": asdict(replace(cfg, guidance=guidance)), "rows": rows}


def format_recovery(report: dict) -> str:
    """A markdown table of :func:`recovery`'s rows."""
    lines = ["| start σ | steps left | colour | colour+shape | relation | all |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['sigma']:.3f} | {r['steps_left']} | {r['colour']:.2f} | {r['shape']:.2f} | "
                     f"{r['relation']:.2f} | {r['all']:.2f} |")
    return "\n".join(lines)


def recovery_main(argv: list[str] | None = None) -> dict:
    """CLI entry point: print the table (and write ``--out`` JSON)."""
    from .model import shapes_pipeline

    d = RecoveryConfig()
    p = argparse.ArgumentParser(prog="mmdit-probe recover-shapes", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--n", type=int, default=d.n, help="scenes (captions) to noise and finish")
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps of the full trajectory")
    p.add_argument("--guidance", type=float, default=d.guidance, help="CFG scale (default: the model's own)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the scenes and the noise")
    p.add_argument("--split", choices=("train", "heldout"), default=d.split,
                   help="train: new scenes with training captions; heldout: never-trained captions")
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped assets)")
    p.add_argument("--out", default=None, help="JSON report path")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    cfg = RecoveryConfig(n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed, split=a.split)
    report = recovery(shapes_pipeline(path=a.weights), cfg, log=lambda m: print(m, file=sys.stdout, flush=True))
    print(format_recovery(report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    recovery_main()

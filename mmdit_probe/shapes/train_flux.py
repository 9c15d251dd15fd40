"""``train-shapes --arch flux``: train a Flux transformer on the shapes world, on the shipped SD3 shapes model's
VAE (its encoder gives the latents, its decoder draws them) and frozen text encoders; nothing else is trained.

Same world, scenes and flow-matching recipe as the SD3 model (:mod:`.fit`); what is Flux's own is the
transformer (:mod:`.flux_model`), the 2x2 packing with ``img_ids``/``txt_ids``, the T5-only text stream and
CLIP-L's pooled vector. The latents are normalised with the base VAE's own shift and scale (the pipeline
decodes with them).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .fit import FlowData, fit_flow
from .flux_model import (FLUX_ASSET_DIR, FluxModelConfig, build_flux_pipeline, build_flux_transformer,
                         encode_flux_captions, flux_velocity, save_flux_assets)
from .model import ASSET_DIR, shapes_pipeline
from .world import WorldConfig, all_captions, make_batch

__all__ = ["train_flux"]


def train_flux(tc, fc: FluxModelConfig | None = None, *, resume: bool = False, ship: bool = False) -> dict:
    """Train the Flux shapes transformer as ``tc`` (a :class:`~.train.TrainConfig`) says; write ``tc.out/final``
    (``transformer.safetensors`` fp16 + ``config.json``) and ``summary.json``; ``ship`` also writes
    ``assets/shapes_flux/``. Returns the summary."""
    from .train import encode_latents, images_tensor, open_log

    tc.check()
    fc = FluxModelConfig() if fc is None else fc
    if not isinstance(fc, FluxModelConfig):
        raise TypeError(f"--arch flux takes a FluxModelConfig, got {type(fc).__name__}")
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # the VAE encoder, as in SD3 training (subnormals in worker threads)
    out = Path(tc.out)
    log, close_log = open_log(out)
    device = torch.device(tc.device)
    base_dir = Path(tc.base) if tc.base else ASSET_DIR
    t0 = time.time()
    base = shapes_pipeline(path=base_dir)  # the SD3 shapes model: VAE + encoders, checksum verified
    if base.vae.config.latent_channels != fc.latent_channels:
        raise ValueError(f"the base VAE has {base.vae.config.latent_channels} latent channels, the config "
                         f"{fc.latent_channels}")
    batch = make_batch(tc.n_scenes, tc.seed, WorldConfig(grid=tc.grid), split="train")
    images = images_tensor(batch.images)
    log(f"world: {len(images)} scenes in {time.time() - t0:.1f}s; base {base_dir}")
    t1 = time.time()
    vae = base.vae.to(device)
    with torch.no_grad():
        mean, _ = encode_latents(vae, images)
    vae.to("cpu")
    if mean.shape[-1] != fc.latent_size:
        raise ValueError(f"base VAE latents are {tuple(mean.shape[1:])}, the config expects size {fc.latent_size}")
    shift_f, scale_f = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    log(f"latents encoded in {time.time() - t1:.1f}s on {device}; base shift {shift_f:.4f} scale {scale_f:.4f}")

    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed + 1)
    transformer = build_flux_transformer(fc)
    pipe = build_flux_pipeline(fc, transformer, base)
    captions = all_captions()
    cap_index = {c: i for i, c in enumerate(captions)}
    emb, pooled = encode_flux_captions(pipe, captions + [""], fc.max_sequence_length)
    cap_ids = torch.tensor([cap_index[c] for c in batch.captions])
    del batch, images
    data = FlowData(mean, shift_f, scale_f, emb, pooled, cap_ids, len(captions))
    n_params = sum(p.numel() for p in transformer.parameters())
    log(f"flux transformer: {fc.num_layers} double + {fc.num_single_layers} single blocks, {n_params} parameters")
    fit = fit_flow(tc, transformer, flux_velocity, data, fc.scheduler_shift, out, log, resume=resume)
    ema = fit.ema.to("cpu")
    summary = {"arch": "flux", "steps": fit.steps, "transformer_minutes": round(fit.seconds / 60, 3),
               "steps_per_second": round(fit.steps / max(fit.seconds, 1e-9), 2),
               "samples_seen": fit.steps * tc.batch, "final_loss": fit.final_loss, "parameters": n_params,
               "device": str(device), "train": dataclasses.asdict(tc),
               "total_wall_minutes_this_run": round((time.time() - t0) / 60, 2)}
    save_flux_assets(ema, fc, out / "final", base_dir, extra={"training": summary})
    if ship:
        save_flux_assets(ema, fc, FLUX_ASSET_DIR, base_dir, extra={"training": summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {summary}")
    close_log()
    return summary

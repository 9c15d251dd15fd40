"""The transformer phase of shapes training, shared by the SD3 and Flux architectures: SD3 rectified flow
(x_t = (1−σ)x0 + σ·noise, target noise − x0, logit-normal σ shifted like the sampler), caption dropout to the
empty prompt, AdamW with warm-up and cosine decay, EMA, wall-clock or step budget, resumable checkpoints.

What differs between architectures is passed in: the model, a :data:`Velocity` function that calls it on
unpacked latents, and optionally a :data:`Conditioner` (SD3's per-encoder dropout).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

__all__ = ["FlowData", "FitResult", "Velocity", "Conditioner", "sample_sigmas", "lr_factor", "flow_loss", "fit_flow"]

#: ``velocity(model, x_t [B,C,H,W], sigma [B], text [B,T,D], pooled [B,P]) -> prediction [B,C,H,W]``
Velocity = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``conditioner(text, pooled, generator) -> (text, pooled)``: changes a batch's conditioning (e.g. drops encoders)
Conditioner = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FlowData:
    """Training data: posterior-mean ``latents`` ``[N, C, H, W]`` (normalised by ``(x − shift) · scale``), per
    caption ``text`` ``[n_captions, T, D]`` and ``pooled`` ``[n_captions, P]`` embeddings, the caption of each
    latent ``caption_ids`` ``[N]``, and ``null``: the row of the empty prompt (caption dropout)."""

    latents: torch.Tensor
    shift: float
    scale: float
    text: torch.Tensor
    pooled: torch.Tensor
    caption_ids: torch.Tensor
    null: int

    def to(self, device: torch.device) -> FlowData:
        """The same data with every tensor on ``device``."""
        return FlowData(self.latents.to(device), self.shift, self.scale, self.text.to(device), self.pooled.to(device),
                        self.caption_ids.to(device), self.null)


@dataclass(frozen=True)
class FitResult:
    """The EMA model (eval mode), steps taken in all, wall-clock seconds in all, the smoothed final loss."""

    ema: torch.nn.Module
    steps: int
    seconds: float
    final_loss: float | None
    losses: list


def sample_sigmas(n: int, shift: float, g: torch.Generator) -> torch.Tensor:
    """SD3 logit-normal sigmas (mean 0, std 1), shifted like the inference scheduler; on ``g``'s device."""
    s = torch.sigmoid(torch.randn(n, generator=g, device=g.device))
    return shift * s / (1 + (shift - 1) * s)


def lr_factor(tc: Any, step: int, elapsed: float) -> float:
    """Linear warm-up over ``tc.warmup`` steps, then cosine decay to 0.1 over the step or time budget."""
    warm = min(1.0, (step + 1) / tc.warmup)
    progress = step / tc.max_steps if tc.max_steps else elapsed / max(tc.minutes * 60, 1e-9)
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def flow_loss(velocity: Velocity, model: torch.nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
              text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: MSE of ``velocity(model, x_t, σ, …)`` against ``noise − x0``; x_t = (1−σ)·x0 + σ·noise."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    pred = velocity(model, (1 - s) * x0 + s * noise, sigma, text, pooled)
    return (pred - (noise - x0)).pow(2).mean()


def _save_ckpt(out: Path, transformer, ema, opt, step: int, elapsed: float, losses: list[float]) -> None:
    tmp = out / "ckpt.tmp"
    tmp.mkdir(exist_ok=True)
    for name, model in (("transformer", transformer), ("ema", ema)):
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / f"{name}.safetensors"))
    torch.save({"opt": opt.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed": elapsed, "losses": losses[-200:]}))
    final = out / "ckpt"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def fit_flow(tc: Any, transformer: torch.nn.Module, velocity: Velocity, data: FlowData, shift: float, out: Path, log,
             *, resume: bool = False, conditioner: Conditioner | None = None) -> FitResult:
    """Train ``transformer`` on ``data`` for ``tc.minutes`` of wall-clock (or ``tc.max_steps``) on ``tc.device``.

    ``tc`` supplies batch, lr, warmup, ema, caption_dropout, seed, ckpt_minutes, log_every, max_steps, minutes
    and device. The per-step random draws use a generator on the device, seeded from (seed, step), so a step
    budget is repeatable on one device. Checkpoints go to ``out/ckpt``; ``resume`` continues from there."""
    device = torch.device(getattr(tc, "device", "cpu"))
    data = data.to(device)
    transformer.to(device)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=tc.lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.type == "cuda" or None)
    step, elapsed, losses = 0, 0.0, []
    if resume and (out / "ckpt" / "state.json").exists():
        ck = out / "ckpt"
        transformer.load_state_dict(load_file(str(ck / "transformer.safetensors")))
        ema.load_state_dict(load_file(str(ck / "ema.safetensors")))
        opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location=device)["opt"])
        st = json.loads((ck / "state.json").read_text())
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min)")
    transformer.train()
    params, ema_params = list(transformer.parameters()), list(ema.parameters())
    bar = tqdm(desc="transformer", unit="step", initial=step, total=tc.max_steps or None, file=sys.stdout,
               mininterval=5)
    seg_start, last_ckpt = time.time(), time.time()
    base_elapsed = elapsed
    loss_avg: torch.Tensor | None = torch.tensor(losses[-1], device=device) if losses else None
    n = len(data.caption_ids)
    while True:
        elapsed = base_elapsed + time.time() - seg_start
        if (tc.max_steps and step >= tc.max_steps) or (not tc.max_steps and elapsed >= tc.minutes * 60):
            break
        g = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + step)
        idx = torch.randint(n, (tc.batch,), generator=g, device=device)
        x0 = (data.latents[idx].float() - data.shift) * data.scale  # posterior mean: deterministic latents
        noise = torch.randn(x0.shape, generator=g, device=device)
        sig = sample_sigmas(tc.batch, shift, g)
        dropped = torch.rand(tc.batch, generator=g, device=device) < tc.caption_dropout
        ci = torch.where(dropped, data.null, data.caption_ids[idx])  # no boolean indexing: no host sync on a GPU
        cond, cond_pooled = data.text[ci], data.pooled[ci]
        if conditioner is not None:
            cond, cond_pooled = conditioner(cond, cond_pooled, g)
        loss = flow_loss(velocity, transformer, x0, noise, sig, cond, cond_pooled)
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(tc, step, elapsed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(tc.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - d)
            loss_avg = loss.detach() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.detach()  # no sync per step
        step += 1
        bar.update(1)
        if step % tc.log_every == 0:
            value = loss_avg.item()
            losses.append(round(value, 5))
            bar.set_postfix(loss=f"{value:.4f}")
            log(f"step {step} loss {value:.4f} lr {opt.param_groups[0]['lr']:.2e} elapsed {elapsed / 60:.2f}m")
        if time.time() - last_ckpt > tc.ckpt_minutes * 60:
            _save_ckpt(out, transformer, ema, opt, step, base_elapsed + time.time() - seg_start, losses)
            last_ckpt = time.time()
            log(f"checkpoint at step {step}")
    bar.close()
    final = None if loss_avg is None else float(loss_avg.item())  # the sync that ends the timed loop
    elapsed = base_elapsed + time.time() - seg_start
    _save_ckpt(out, transformer, ema, opt, step, elapsed, losses)
    return FitResult(ema.eval(), step, elapsed, final, losses)

"""Train the shapes-world SD3 model: VAE first, then the MMDiT with SD3 rectified-flow matching.

``python -m mmdit_probe.shapes.train --out DIR [--minutes M | --max-steps N] [--threads T] [--resume] [--ship]``

Resumable: the transformer phase checkpoints every ``--ckpt-minutes`` into ``DIR``; ``--resume``
continues from the last checkpoint (step counter, optimiser, EMA and elapsed time). ``--minutes``
is the total time budget of the transformer phase (the defaults reproduce the shipped v5);
``--max-steps`` stops after a fixed number of steps instead (then the learning-rate schedule
follows steps, so a run is repeatable).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .model import ASSET_DIR, ModelConfig, build_pipeline, build_transformer, build_vae, save_assets
from .world import WorldConfig, all_captions, make_batch

__all__ = ["TrainConfig", "images_tensor", "encoder_masks", "train", "train_main", "build_parser"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (minutes are wall-clock budgets)."""

    out: str = "shapes_run"
    minutes: float = 45.0
    max_steps: int = 0  # > 0: train for this many steps instead of ``minutes`` of wall-clock
    vae_minutes: float = 4.0
    decoder_minutes: float = 2.0  # decoder-only fine-tuning after the transformer (encoder frozen)
    n_scenes: int = 40000
    grid: int = 1  # WorldConfig.grid of the training scenes (v4 tried 4)
    batch: int = 32
    vae_batch: int = 16
    lr: float = 5e-4
    vae_lr: float = 2e-3
    vae_noise: float = 0.1  # Gaussian noise added to the posterior mean while training the decoder
    warmup: int = 150
    ema: float = 0.998
    caption_dropout: float = 0.1
    encoder_dropout: float = 0.0  # > 0: zero CLIP-L / CLIP-G / T5 independently with this probability (SD3 used 0.463)
    ckpt_minutes: float = 3.0
    seed: int = 0
    log_every: int = 25
    threads: int = 2  # intra-op threads of the transformer phase (the VAE phases always use 1, see train())


def images_tensor(images: np.ndarray) -> torch.Tensor:
    """World images ``[N, H, W, 3]`` in 0…1 -> the VAE's input ``[N, 3, H, W]`` in -1…1."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().mul(2).sub(1)


def _fit_autoencoder(vae, images: torch.Tensor, tc: TrainConfig, log, *, desc: str, minutes: float, lr: float,
                     seed: int, decoder_only: bool) -> float:
    """Reconstruction training of ``vae`` (or of its decoder alone, encoder frozen) for ``minutes``.

    The decoder sees the posterior *mean* plus ``tc.vae_noise`` Gaussian noise; object pixels weigh 5x.
    ``images``: ``[N,3,H,W]`` in -1…1. Returns the smoothed final MSE."""
    params = vae.decoder.parameters() if decoder_only else vae.parameters()
    if decoder_only:
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start, step, mse_avg = time.time(), 0, None
    bar = tqdm(desc=desc, unit="step", file=sys.stdout, mininterval=5)
    (vae.decoder if decoder_only else vae).train()
    while time.time() - start < minutes * 60:
        x = images[torch.randint(len(images), (tc.vae_batch,), generator=g)]
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        z = post.mean + tc.vae_noise * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        weight = 1.0 + 4.0 * (x > -0.5).any(1, keepdim=True).float()  # object pixels count 5x
        mse = (rec - x).pow(2).mean()
        loss = ((rec - x).pow(2) * weight).mean()
        if not decoder_only:
            loss = loss + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        mse_avg = mse.item() if mse_avg is None else 0.95 * mse_avg + 0.05 * mse.item()
        bar.update(1)
        if step % tc.log_every == 0:
            bar.set_postfix(mse=f"{mse_avg:.4f}")
            log(f"{desc} step {step} mse {mse_avg:.4f}")
    bar.close()
    vae.requires_grad_(True)
    vae.eval()
    return float(mse_avg or 0.0)


def train_vae(vae, images: torch.Tensor, tc: TrainConfig, log) -> float:
    """Train ``vae`` on ``images`` (``[N,3,H,W]`` in -1…1) for ``tc.vae_minutes``; return final MSE."""
    return _fit_autoencoder(vae, images, tc, log, desc="vae", minutes=tc.vae_minutes, lr=tc.vae_lr,
                            seed=tc.seed + 17, decoder_only=False)


def finetune_decoder(vae, images: torch.Tensor, minutes: float, tc: TrainConfig, log) -> float:
    """Train only the decoder (encoder frozen, so latents and the transformer stay valid); return MSE."""
    return _fit_autoencoder(vae, images, tc, log, desc="decoder", minutes=minutes, lr=tc.vae_lr / 2,
                            seed=tc.seed + 29, decoder_only=True)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (fp16)."""
    means, stds = [], []
    for i in range(0, len(images), chunk):
        d = vae.encode(images[i:i + chunk]).latent_dist
        means.append(d.mean.half())
        stds.append(d.std.half())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text embeddings ``[n, 77+max_len, D]`` and pooled ``[n, P]`` for ``captions``."""
    embs, pooled = [], []
    for i in range(0, len(captions), 64):
        e, _, p, _ = pipe.encode_prompt(captions[i:i + 64], None, None, do_classifier_free_guidance=False,
                                        max_sequence_length=max_len)
        embs.append(e.float())
        pooled.append(p.float())
    return torch.cat(embs), torch.cat(pooled)


def encoder_masks(pipe, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each text encoder lives in the conditioning: token masks ``[3, 77+T, D]`` and pooled masks
    ``[3, P]`` for CLIP-L, CLIP-G and T5 (CLIP-L ⊕ CLIP-G on the channels of the first 77 tokens, T5 after
    them; pooled = CLIP-L ⊕ CLIP-G), as ``encode_prompt`` lays them out."""
    n_clip, dim = pipe.tokenizer_max_length, pipe.transformer.config.joint_attention_dim
    h_l, h_g = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    p_l, p_g = pipe.text_encoder.config.projection_dim, pipe.text_encoder_2.config.projection_dim
    tokens = torch.zeros(3, n_clip + max_sequence_length, dim)
    pooled = torch.zeros(3, p_l + p_g)
    tokens[0, :n_clip, :h_l] = 1
    tokens[1, :n_clip, h_l:h_l + h_g] = 1
    tokens[2, n_clip:] = 1
    pooled[0, :p_l] = 1
    pooled[1, p_l:] = 1
    return tokens, pooled


def _lr_factor(tc: TrainConfig, step: int, elapsed: float) -> float:
    warm = min(1.0, (step + 1) / tc.warmup)
    progress = step / tc.max_steps if tc.max_steps else elapsed / max(tc.minutes * 60, 1e-9)
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def sample_sigmas(n: int, shift: float, g: torch.Generator) -> torch.Tensor:
    """SD3 logit-normal sigmas (mean 0, std 1), shifted like the inference scheduler."""
    s = torch.sigmoid(torch.randn(n, generator=g))
    return shift * s / (1 + (shift - 1) * s)


def _save_ckpt(out: Path, transformer, ema, opt, step: int, elapsed: float, losses: list[float]) -> None:
    tmp = out / "ckpt.tmp"
    tmp.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(tmp / "transformer.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    torch.save({"opt": opt.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed": elapsed, "losses": losses[-200:]}))
    final = out / "ckpt"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def train(tc: TrainConfig, mc: ModelConfig = ModelConfig(), *, resume: bool = False, ship: bool = False) -> dict:
    """Run both phases into ``tc.out``; return a summary dict (also written to ``summary.json``)."""
    torch.set_flush_denormal(True)
    # The VAE phases run single-threaded: with 2 intra-op threads a VAE step on real scenes took
    # ~10x longer (subnormal floats in the worker threads, which set_flush_denormal does not reach).
    # The transformer phase does not suffer from it: 2 threads ran 1.7x faster than 1 on this CPU
    # (--threads 2, the default since v5; v1/v2 were trained with 1).
    torch.set_num_threads(1)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a")

    def log(msg: str) -> None:
        logf.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        logf.flush()

    t0 = time.time()
    batch = make_batch(tc.n_scenes, tc.seed, WorldConfig(grid=tc.grid), split="train")
    images = images_tensor(batch.images)
    log(f"world: {len(images)} scenes in {time.time() - t0:.1f}s")

    torch.manual_seed(tc.seed)
    vae = build_vae(mc)
    vae_file = out / "vae.safetensors"
    if resume and vae_file.exists():
        vae.load_state_dict(load_file(str(vae_file)))
        vae_mse = json.loads((out / "vae.json").read_text())["mse"]
        vae.eval()
    else:
        vae_mse = train_vae(vae, images, tc, log)
        save_file(vae.state_dict(), str(vae_file))
        (out / "vae.json").write_text(json.dumps({"mse": vae_mse}))
    log(f"vae mse {vae_mse:.4f}")
    t1 = time.time()
    mean, std = encode_latents(vae, images)
    shift_f = float(mean.float().mean())
    scale_f = float(1.0 / mean.float().std())
    vae.register_to_config(scaling_factor=scale_f, shift_factor=shift_f)
    log(f"latents encoded in {time.time() - t1:.1f}s shift {shift_f:.4f} scale {scale_f:.4f}")

    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed + 1)
    transformer = build_transformer(mc)
    pipe = build_pipeline(mc, transformer, vae)
    captions = all_captions()
    cap_index = {c: i for i, c in enumerate(captions)}
    emb, pooled = encode_captions(pipe, captions + [""], mc.max_sequence_length)
    null = len(captions)
    tok_masks, pool_masks = encoder_masks(pipe, mc.max_sequence_length)
    cap_ids = torch.tensor([cap_index[c] for c in batch.captions])
    del batch

    ema = copy.deepcopy(transformer).requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=tc.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed, losses = 0, 0.0, []
    if resume and (out / "ckpt" / "state.json").exists():
        ck = out / "ckpt"
        transformer.load_state_dict(load_file(str(ck / "transformer.safetensors")))
        ema.load_state_dict(load_file(str(ck / "ema.safetensors")))
        opt.load_state_dict(torch.load(ck / "optimizer.pt")["opt"])
        st = json.loads((ck / "state.json").read_text())
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min)")
    transformer.train()
    bar = tqdm(desc="transformer", unit="step", initial=step, total=tc.max_steps or None, file=sys.stdout,
               mininterval=5)
    seg_start, last_ckpt = time.time(), time.time()
    base_elapsed = elapsed
    loss_avg = losses[-1] if losses else None
    while True:
        elapsed = base_elapsed + time.time() - seg_start
        if (tc.max_steps and step >= tc.max_steps) or (not tc.max_steps and elapsed >= tc.minutes * 60):
            break
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        idx = torch.randint(len(cap_ids), (tc.batch,), generator=g)
        x0 = (mean[idx].float() - shift_f) * scale_f  # posterior mean: deterministic latents
        noise = torch.randn(x0.shape, generator=g)
        sig = sample_sigmas(tc.batch, mc.scheduler_shift, g)
        xt = (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * noise
        ci = cap_ids[idx].clone()
        ci[torch.rand(tc.batch, generator=g) < tc.caption_dropout] = null
        cond, cond_pooled = emb[ci], pooled[ci]
        if tc.encoder_dropout > 0:  # SD3's independent per-encoder dropout (zeros, as the pipeline feeds without T5)
            drop = (torch.rand(tc.batch, 3, generator=g) < tc.encoder_dropout).float()
            cond = cond * (1 - torch.einsum("be,etd->btd", drop, tok_masks))
            cond_pooled = cond_pooled * (1 - drop @ pool_masks)
        pred = transformer(hidden_states=xt, timestep=sig * 1000, encoder_hidden_states=cond,
                           pooled_projections=cond_pooled).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = tc.lr * _lr_factor(tc, step, elapsed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(tc.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - d)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        if step % tc.log_every == 0:
            losses.append(round(loss_avg, 5))
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            log(f"step {step} loss {loss_avg:.4f} lr {opt.param_groups[0]['lr']:.2e} elapsed {elapsed / 60:.1f}m")
        if time.time() - last_ckpt > tc.ckpt_minutes * 60:
            _save_ckpt(out, transformer, ema, opt, step, base_elapsed + time.time() - seg_start, losses)
            last_ckpt = time.time()
            log(f"checkpoint at step {step}")
    bar.close()
    elapsed = base_elapsed + time.time() - seg_start
    _save_ckpt(out, transformer, ema, opt, step, elapsed, losses)
    ema.eval()
    dec_file = out / "vae_ft.safetensors"
    if resume and dec_file.exists():
        vae.load_state_dict(load_file(str(dec_file)))
        dec_mse = json.loads((out / "vae_ft.json").read_text())["mse"]
    elif tc.decoder_minutes > 0:
        torch.set_num_threads(1)
        dec_mse = finetune_decoder(vae, images, tc.decoder_minutes, tc, log)
        save_file(vae.state_dict(), str(dec_file))
        (out / "vae_ft.json").write_text(json.dumps({"mse": dec_mse}))
    else:
        dec_mse = vae_mse
    vae.register_to_config(scaling_factor=scale_f, shift_factor=shift_f)
    final_pipe = build_pipeline(mc, ema, vae)
    summary = {"steps": step, "transformer_minutes": round(elapsed / 60, 2), "final_loss": loss_avg,
               "vae_mse": vae_mse, "decoder_mse": dec_mse, "train": dataclasses.asdict(tc),
               "total_wall_minutes_this_run": round((time.time() - t0) / 60, 2)}
    save_assets(final_pipe, mc, out / "final", extra={"training": summary})
    if ship:
        save_assets(final_pipe, mc, ASSET_DIR, extra={"training": summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {summary}")
    logf.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``train-shapes``."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="mmdit-probe train-shapes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, final weights)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="transformer time budget (total, incl. resumed)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps (0: use --minutes)")
    p.add_argument("--vae-minutes", type=float, default=d.vae_minutes, help="VAE training time budget")
    p.add_argument("--decoder-minutes", type=float, default=d.decoder_minutes,
                   help="decoder-only fine-tuning after the transformer (encoder frozen)")
    p.add_argument("--n-scenes", type=int, default=d.n_scenes, help="training scenes generated")
    p.add_argument("--batch", type=int, default=d.batch, help="transformer batch size")
    p.add_argument("--encoder-dropout", type=float, default=d.encoder_dropout,
                   help="zero each text encoder independently with this probability (SD3: 0.463; 0: off)")
    p.add_argument("--grid", type=int, default=d.grid, help="snap object sizes/boxes to this many pixels (1: off)")
    p.add_argument("--ckpt-minutes", type=float, default=d.ckpt_minutes, help="minutes between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of scenes and initialisation")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads of the transformer phase")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--ship", action="store_true", help="also write the final weights into the package assets")
    return p


def train_main(argv: list[str] | None = None) -> dict:
    """CLI entry point."""
    a = build_parser().parse_args(argv)
    given = vars(a)  # every option named like a TrainConfig field sets it; --resume/--ship are not fields
    tc = TrainConfig(**{f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given})
    return train(tc, resume=a.resume, ship=a.ship)


if __name__ == "__main__":
    train_main()

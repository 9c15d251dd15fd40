"""Train the shapes-world model (SD3, or a Flux transformer with --arch flux) with rectified-flow matching.

SD3 (the default) trains a VAE first, then the MMDiT; ``--arch flux`` trains only a Flux transformer, on the
shipped SD3 model's VAE and text encoders (:mod:`.train_flux`).

``python -m mmdit_probe.shapes.train --out DIR [--arch sd3|flux] [--minutes M | --max-steps N] [--device D]
[--threads T] [--resume] [--ship]``

Resumable: the transformer phase checkpoints every ``--ckpt-minutes`` into ``DIR``; ``--resume``
continues from the last checkpoint (step counter, optimiser, EMA and elapsed time). ``--minutes``
is the total time budget of the transformer phase (the defaults reproduce the shipped v5);
``--max-steps`` stops after a fixed number of steps instead (then the learning-rate schedule
follows steps, so a run is repeatable). ``--device cuda`` runs the transformer phase (and, for Flux,
the latent encoding) on the GPU; SD3's VAE phases stay on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .fit import FlowData, fit_flow, lr_factor as _lr_factor, sample_sigmas  # noqa: F401  (re-exported names)
from .model import ARCHS, ASSET_DIR, ModelConfig, build_pipeline, build_transformer, build_vae, save_assets
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
    arch: str = "sd3"  # "sd3" (VAE + SD3 MMDiT) or "flux" (FluxTransformer2DModel on the base model's VAE/encoders)
    device: str = "cpu"  # device of the transformer phase ("cuda", "cuda:1", ...)
    base: str = ""  # --arch flux: the SD3 shapes weights whose VAE and text encoders are used ("": the shipped ones)

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is computed."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; use one of {ARCHS}")
        if self.arch == "flux" and self.encoder_dropout > 0:
            raise ValueError("--encoder-dropout drops SD3's three text encoders; Flux has one text stream (T5) and "
                             "CLIP pooled only: leave it at 0 with --arch flux")
        if self.arch == "sd3" and self.base:
            raise ValueError("--base picks the VAE/text encoders of a Flux run; SD3 trains its own: drop it")
        try:
            dev = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"bad --device {self.device!r} ({err}); use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} but torch sees no CUDA GPU here; use --device cpu")
        if self.batch < 1 or self.minutes <= 0 and self.max_steps <= 0:
            raise ValueError("--batch must be >= 1 and one of --minutes / --max-steps positive")


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
    """Posterior mean and std of every image (fp16, on the VAE's device)."""
    means, stds = [], []
    for i in range(0, len(images), chunk):
        d = vae.encode(images[i:i + chunk].to(vae.device)).latent_dist
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


def open_log(out: Path):
    """``(log(msg), close())`` appending time-stamped lines to ``out/train.log``."""
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a")

    def log(msg: str) -> None:
        logf.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        logf.flush()

    return log, logf.close


def sd3_velocity(model, xt: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
    """SD3's prediction for latents ``xt`` ``[B,C,H,W]`` at ``sigma`` ``[B]`` (timestep 1000σ, as the pipeline
    calls it)."""
    return model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text, pooled_projections=pooled).sample


def train(tc: TrainConfig, mc=None, *, resume: bool = False, ship: bool = False) -> dict:
    """Run the phases into ``tc.out``; return a summary dict (also written to ``summary.json``).

    ``tc.arch == "flux"`` trains only a Flux transformer (:func:`.train_flux.train_flux`; ``mc`` then a
    :class:`~.flux_model.FluxModelConfig`); else VAE + SD3 MMDiT (``mc`` a :class:`ModelConfig`)."""
    tc.check()
    threads = torch.get_num_threads()
    try:  # the phases set their own thread counts; the caller's is restored
        if tc.arch == "flux":
            from .train_flux import train_flux

            return train_flux(tc, mc, resume=resume, ship=ship)
        return _train_sd3(tc, ModelConfig() if mc is None else mc, resume=resume, ship=ship)
    finally:
        torch.set_num_threads(threads)


def _train_sd3(tc: TrainConfig, mc: ModelConfig, *, resume: bool, ship: bool) -> dict:
    """VAE, latents, SD3 MMDiT (:func:`.fit.fit_flow`), decoder fine-tuning; the final weights (see :func:`train`)."""
    torch.set_flush_denormal(True)
    # The VAE phases run single-threaded: with 2 intra-op threads a VAE step on real scenes took
    # ~10x longer (subnormal floats in the worker threads, which set_flush_denormal does not reach).
    # The transformer phase does not suffer from it: 2 threads ran 1.7x faster than 1 on this CPU
    # (--threads 2, the default since v5; v1/v2 were trained with 1).
    torch.set_num_threads(1)
    out = Path(tc.out)
    log, close_log = open_log(out)

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
    cap_ids = torch.tensor([cap_index[c] for c in batch.captions])
    del batch
    data = FlowData(mean, shift_f, scale_f, emb, pooled, cap_ids, len(captions))
    conditioner = None
    if tc.encoder_dropout > 0:  # SD3's independent per-encoder dropout (zeros, as the pipeline feeds without T5)
        tok_masks, pool_masks = (m.to(tc.device) for m in encoder_masks(pipe, mc.max_sequence_length))

        def conditioner(cond, cond_pooled, g):
            drop = (torch.rand(cond.shape[0], 3, generator=g, device=g.device) < tc.encoder_dropout).float()
            return (cond * (1 - torch.einsum("be,etd->btd", drop, tok_masks)), cond_pooled * (1 - drop @ pool_masks))

    fit = fit_flow(tc, transformer, sd3_velocity, data, mc.scheduler_shift, out, log, resume=resume,
                   conditioner=conditioner)
    ema = fit.ema.to("cpu")
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
    summary = {"steps": fit.steps, "transformer_minutes": round(fit.seconds / 60, 2), "final_loss": fit.final_loss,
               "vae_mse": vae_mse, "decoder_mse": dec_mse, "train": dataclasses.asdict(tc),
               "total_wall_minutes_this_run": round((time.time() - t0) / 60, 2)}
    save_assets(final_pipe, mc, out / "final", extra={"training": summary})
    if ship:
        save_assets(final_pipe, mc, ASSET_DIR, extra={"training": summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {summary}")
    close_log()
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``train-shapes``."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="mmdit-probe train-shapes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, final weights)")
    p.add_argument("--arch", choices=ARCHS, default=d.arch,
                   help="sd3: VAE + SD3 MMDiT (the default model); flux: a Flux transformer (double + single-stream "
                        "blocks) on the shipped model's VAE and text encoders")
    p.add_argument("--device", default=d.device, help="device of the transformer phase (cpu, cuda, cuda:N)")
    p.add_argument("--base", default=d.base,
                   help="--arch flux: the SD3 shapes weights whose VAE and text encoders are used (default: shipped)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="transformer time budget (total, incl. resumed)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps (0: use --minutes)")
    p.add_argument("--vae-minutes", type=float, default=d.vae_minutes, help="VAE training time budget")
    p.add_argument("--decoder-minutes", type=float, default=d.decoder_minutes,
                   help="decoder-only fine-tuning after the transformer (encoder frozen)")
    p.add_argument("--n-scenes", type=int, default=d.n_scenes, help="training scenes generated")
    p.add_argument("--batch", type=int, default=d.batch, help="transformer batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the transformer (AdamW)")
    p.add_argument("--encoder-dropout", type=float, default=d.encoder_dropout,
                   help="zero each text encoder independently with this probability (SD3: 0.463; 0: off)")
    p.add_argument("--grid", type=int, default=d.grid, help="snap object sizes/boxes to this many pixels (1: off)")
    p.add_argument("--ckpt-minutes", type=float, default=d.ckpt_minutes, help="minutes between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of scenes and initialisation")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between loss lines in train.log")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads of the transformer phase")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--ship", action="store_true",
                   help="also write the final weights into the package assets (assets/shapes/, or assets/shapes_flux/)")
    return p


def train_main(argv: list[str] | None = None) -> dict:
    """CLI entry point."""
    a = build_parser().parse_args(argv)
    given = vars(a)  # every option named like a TrainConfig field sets it; --resume/--ship are not fields
    tc = TrainConfig(**{f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given})
    tc.check()
    return train(tc, resume=a.resume, ship=a.ship)


if __name__ == "__main__":
    train_main()

"""The shapes-world model on Flux.1's architecture: a trained ``FluxTransformer2DModel`` (double- then
single-stream blocks) around the *shipped* SD3 shapes model's VAE and text encoders.

Only the transformer is Flux's own: the VAE (16 latent channels, 64x64 px -> 16x16 latents, packed 2x2 ->
8x8 = 64 image tokens of 64 channels) and the frozen in-code encoders come from ``assets/shapes/`` — CLIP-L's
pooled output (Flux's ``pooled_projections``; CLIP-L's text layers, without SD3's projection) and T5 (the
text stream: ``max_sequence_length`` tokens, no CLIP tokens). Weights: ``assets/shapes_flux/`` holds
``transformer.safetensors`` and ``config.json``, which records which VAE and encoders it was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from ..models import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, _quiet_image_processor_fallback
from .model import ASSET_DIR, JOINT_DIM

with _quiet_image_processor_fallback():
    from diffusers import FluxPipeline, FluxTransformer2DModel

__all__ = ["FluxModelConfig", "FLUX_ASSET_DIR", "POOLED_DIM", "build_flux_transformer", "flux_text_encoder",
           "build_flux_pipeline", "flux_velocity", "encode_flux_captions", "base_fingerprint", "save_flux_assets",
           "load_flux_config", "flux_shapes_pipeline", "flux_run_kwargs"]

FLUX_ASSET_DIR = ASSET_DIR.parent / "shapes_flux"
POOLED_DIM = 16  # CLIP-L hidden size of the shapes model's encoders (tiny_sd3_pipeline: joint_dim // 2 split in two)


@dataclass(frozen=True)
class FluxModelConfig:
    """Sizes of the Flux shapes transformer (2 double + 4 single blocks, 4 heads x 32: 2.30 M parameters,
    the SD3 toy has 2.29 M) and its sampling defaults. Latent sizes are the shipped VAE's."""

    num_layers: int = 2  # double-stream blocks (Flux.1-dev: 19)
    num_single_layers: int = 4  # single-stream blocks (Flux.1-dev: 38)
    num_heads: int = 4
    head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # rotary dims of (t, row, column); sum = head_dim
    latent_channels: int = 16
    latent_size: int = 16
    max_sequence_length: int = 12
    scheduler_shift: float = 3.0  # training sigmas and the sampler (static shift, as the SD3 toy)
    default_steps: int = 20
    default_guidance: float = 5.0  # true CFG scale (no guidance embedding: the model is not distilled)

    arch = "flux"  # class attribute, not a field: what config.json's "arch" says

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to head_dim {self.head_dim}")
        if self.latent_size % 2:
            raise ValueError(f"latent_size {self.latent_size} must be even (2x2 packing)")
        if min(self.num_layers, self.num_single_layers, self.num_heads) < 1:
            raise ValueError("num_layers, num_single_layers and num_heads must be positive")


def build_flux_transformer(cfg: FluxModelConfig) -> FluxTransformer2DModel:
    """Flux's MMDiT sized by ``cfg``: ``4 * latent_channels`` input channels (packed 2x2), T5-width text, no
    guidance embedding."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=False,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    )


def flux_text_encoder(base: StableDiffusion3Pipeline) -> CLIPTextModel:
    """``base``'s CLIP-L text layers as the ``CLIPTextModel`` whose ``pooler_output`` Flux takes (SD3's projection
    is dropped)."""
    clip = CLIPTextModel(base.text_encoder.config)
    src = {k[len("text_model."):]: v for k, v in base.text_encoder.state_dict().items() if k.startswith("text_model.")}
    prefix = "text_model." if next(iter(clip.state_dict())).startswith("text_model.") else ""  # transformers 4 vs 5
    clip.load_state_dict({prefix + k: v for k, v in src.items()})
    return clip.to(device=base.text_encoder.device, dtype=base.text_encoder.dtype).eval()


def build_flux_pipeline(cfg: FluxModelConfig, transformer: FluxTransformer2DModel,
                        base: StableDiffusion3Pipeline) -> FluxPipeline:
    """A ``FluxPipeline`` around ``transformer`` with ``base``'s VAE, CLIP-L (pooled) and T5 and their tokenizers.

    ``pipe(prompt)`` makes 64x64 images (``default_sample_size`` = the latent size); sample with
    :func:`flux_run_kwargs` (true CFG against the empty prompt)."""
    t5, vae = base.text_encoder_3, base.vae
    if t5 is None:
        raise ValueError("the base pipeline has no T5 (text_encoder_3), Flux's text stream: load it with "
                         "shapes_pipeline()")
    tc = transformer.config
    if tc.joint_attention_dim != t5.config.d_model or tc.pooled_projection_dim != base.text_encoder.config.hidden_size:
        raise ValueError(f"transformer text sizes ({tc.joint_attention_dim}, {tc.pooled_projection_dim}) do not match "
                         f"the base encoders (T5 {t5.config.d_model}, CLIP-L {base.text_encoder.config.hidden_size})")
    if tc.in_channels != 4 * vae.config.latent_channels:
        raise ValueError(f"transformer in_channels {tc.in_channels} != 4 x VAE latent channels "
                         f"{vae.config.latent_channels}")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift),
                        vae=vae, text_encoder=flux_text_encoder(base), tokenizer=base.tokenizer, text_encoder_2=t5,
                        tokenizer_2=base.tokenizer_3, transformer=transformer)
    pipe.default_sample_size = cfg.latent_size  # an instance attribute of FluxPipeline (128 -> 1024 px by default)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_velocity(transformer: FluxTransformer2DModel, latents: torch.Tensor, sigma: torch.Tensor,
                  text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The transformer's prediction for unpacked ``latents`` ``[B, C, H, W]`` at noise level ``sigma`` ``[B]``,
    called as ``FluxPipeline`` calls it (2x2 packing, its ``img_ids``, zero ``txt_ids``, timestep = sigma);
    ``text`` ``[B, T, 32]`` (T5), ``pooled`` ``[B, 16]`` (CLIP-L). Returns ``[B, C, H, W]``."""
    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
    out = transformer(hidden_states=packed, timestep=sigma, guidance=None, pooled_projections=pooled,
                      encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, 1)


@torch.no_grad()
def encode_flux_captions(pipe: FluxPipeline, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen T5 embeddings ``[n, max_len, 32]`` and CLIP-L pooled ``[n, 16]`` of ``captions``
    (``pipe.encode_prompt``)."""
    embs, pooled = [], []
    for i in range(0, len(captions), 64):
        e, p, _ = pipe.encode_prompt(captions[i:i + 64], None, max_sequence_length=max_len)
        embs.append(e.float())
        pooled.append(p.float())
    return torch.cat(embs), torch.cat(pooled)


def base_fingerprint(base_dir: Path) -> dict[str, str]:
    """What a Flux transformer was trained against: the base model's encoder checksum and VAE file hash."""
    meta = json.loads((Path(base_dir) / "config.json").read_text())
    vae = hashlib.sha256((Path(base_dir) / "vae.safetensors").read_bytes()).hexdigest()
    return {"encoder_checksum": meta["encoder_checksum"], "vae_sha256": vae}


def save_flux_assets(transformer: FluxTransformer2DModel, cfg: FluxModelConfig, out: Path, base_dir: Path = ASSET_DIR,
                     extra: dict | None = None) -> None:
    """Write ``transformer.safetensors`` (fp16) and ``config.json`` (arch, sizes, base fingerprint) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in transformer.state_dict().items()},
              str(out / "transformer.safetensors"))
    meta = {"arch": "flux", "model": dataclasses.asdict(cfg), "base": base_fingerprint(base_dir), **(extra or {})}
    (out / "config.json").write_text(json.dumps(meta, indent=2))


def load_flux_config(path: Path = FLUX_ASSET_DIR) -> tuple[FluxModelConfig, dict]:
    """``(FluxModelConfig, full JSON)`` from ``path/config.json``."""
    meta = json.loads((Path(path) / "config.json").read_text())
    if meta.get("arch") != "flux":
        raise ValueError(f"{path}/config.json is not a Flux shapes model (arch {meta.get('arch', 'sd3')!r})")
    m = dict(meta["model"])
    m["axes_dims_rope"] = tuple(m["axes_dims_rope"])
    return FluxModelConfig(**m), meta


def flux_run_kwargs(cfg: FluxModelConfig) -> dict:
    """``pipe(prompt, **kwargs)`` settings the model ships with: steps, true CFG against ``""``, T5 length."""
    return {"num_inference_steps": cfg.default_steps, "true_cfg_scale": cfg.default_guidance, "negative_prompt": "",
            "max_sequence_length": cfg.max_sequence_length}


def flux_shapes_pipeline(path: str | Path | None = None, *, base_path: str | Path | None = None, device: str = "cpu",
                         torch_dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """The trained Flux shapes pipeline: transformer from ``path`` (default ``assets/shapes_flux/``), VAE and text
    encoders from the SD3 shapes model at ``base_path`` (default ``assets/shapes/``), refused if they are not the
    ones it was trained with. ``pipe.shapes_config`` / ``pipe.shipped_run_kwargs`` as for the SD3 model."""
    from .model import shapes_pipeline

    root = Path(path) if path is not None else FLUX_ASSET_DIR
    base_dir = Path(base_path) if base_path is not None else ASSET_DIR
    cfg, meta = load_flux_config(root)
    got = base_fingerprint(base_dir)
    if got != meta["base"]:
        raise RuntimeError(f"the Flux shapes transformer in {root} was trained on another VAE / text encoders than "
                           f"those in {base_dir} ({meta['base']} != {got}); retrain it (train-shapes --arch flux) or "
                           "pass base_path= the SD3 shapes model it was trained with")
    base = shapes_pipeline(path=base_dir)
    transformer = build_flux_transformer(cfg)
    transformer.load_state_dict({k: v.float() for k, v in load_file(str(root / "transformer.safetensors")).items()})
    pipe = build_flux_pipeline(cfg, transformer.eval(), base)
    if torch_dtype != torch.float32:
        for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            m.to(dtype=torch_dtype)
    pipe.shapes_config = cfg  # type: ignore[attr-defined]
    pipe.shipped_run_kwargs = flux_run_kwargs(cfg)  # type: ignore[attr-defined]
    return pipe.to(device)

"""Components of the shapes-world SD3 model, the loader of the shipped weights, and the embedded
default model (:func:`default_pipeline`) with the run kwargs it ships with (:func:`default_run_kwargs`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..families import resolve_family

from ..models import (  # diffusers classes via models: it imports the pipelines without transformers' noise
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WeightsNotAvailableError,
    tiny_sd3_pipeline,
)
from .world import world_vocab

__all__ = [
    "ModelConfig", "ASSET_DIR", "build_vae", "build_transformer", "build_pipeline", "text_encoder_state",
    "encoder_checksum", "shapes_pipeline", "shapes_prompt_examples", "save_assets", "load_config",
    "default_pipeline", "default_run_kwargs", "TINY_RUN_KWARGS", "SD3_RUN_KWARGS", "ARCHS", "weights_arch",
]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes"
JOINT_DIM, POOLED_DIM = 32, 64  # sizes of the in-code text encoders (models.py defaults)
#: run kwargs of the random tiny pipelines (small and fast) and of real SD3 / SD3.5 checkpoints
TINY_RUN_KWARGS = {"num_inference_steps": 8, "guidance_scale": 5.0, "max_sequence_length": 16}
SD3_RUN_KWARGS = {"num_inference_steps": 28, "guidance_scale": 5.0, "max_sequence_length": 256}
ARCHS = ("sd3", "flux")  # transformer architectures of the shapes model (train-shapes --arch)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the shapes model (image 64x64 -> 16x16x16 latents -> 8x8 = 64 image tokens) and its sampling defaults."""

    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    latent_channels: int = 16
    latent_size: int = 16
    vae_channels: tuple[int, ...] = (8, 16, 32)
    max_sequence_length: int = 12
    scheduler_shift: float = 3.0  # training sigmas and the inference scheduler (SD3's own value; v1/v2: 1.0)
    encoder_seed: int = 0
    default_steps: int = 20
    default_guidance: float = 5.0  # chosen on validation prompts (v5: 0.95 colour+shape at 5, 0.82 at 7)


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """A 3-block AutoencoderKL (scale factor 4) with ``cfg.latent_channels`` latent channels."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=8, sample_size=cfg.latent_size * 2 ** (n - 1), scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def build_transformer(cfg: ModelConfig) -> SD3Transformer2DModel:
    """An SD3 (not 3.5) MMDiT sized by ``cfg``."""
    return SD3Transformer2DModel(
        sample_size=cfg.latent_size, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads, joint_attention_dim=JOINT_DIM,
        caption_projection_dim=cfg.num_heads * cfg.head_dim, pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=cfg.latent_size // cfg.patch_size,
    )


def build_pipeline(cfg: ModelConfig, transformer: SD3Transformer2DModel, vae: AutoencoderKL,
                   *, device: str = "cpu", torch_dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """The StableDiffusion3Pipeline around ``transformer``/``vae`` with world-vocabulary text encoders."""
    pipe = tiny_sd3_pipeline("sd3", seed=cfg.encoder_seed, vocab=world_vocab(), transformer=transformer, vae=vae)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift)
    pipe.set_progress_bar_config(disable=True)
    if torch_dtype != torch.float32:
        for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            m.to(dtype=torch_dtype)
    return pipe.to(device)


def text_encoder_state(pipe: StableDiffusion3Pipeline) -> dict[str, torch.Tensor]:
    """All text-encoder tensors, prefixed ``te1.``/``te2.``/``te3.``."""
    out = {}
    for pre, m in (("te1.", pipe.text_encoder), ("te2.", pipe.text_encoder_2), ("te3.", pipe.text_encoder_3)):
        for k, v in m.state_dict().items():
            out[pre + k] = v.detach().float().contiguous().clone()
    return out


def encoder_checksum(pipe: StableDiffusion3Pipeline, prompt: str = "a red circle left of a blue square") -> str:
    """SHA-256 of the tokens and (rounded) text embeddings of ``prompt``: identifies the frozen text side."""
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=12)
    h = hashlib.sha256()
    for tok in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3):
        h.update(json.dumps(tok(prompt)["input_ids"]).encode())
    h.update((emb.float() * 1e3).round().to(torch.int64).numpy().tobytes())
    h.update((pooled.float() * 1e3).round().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def save_assets(pipe: StableDiffusion3Pipeline, cfg: ModelConfig, out: Path, extra: dict | None = None) -> None:
    """Write ``transformer``/``vae``/``text_encoders`` safetensors (fp16) and ``config.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    half = lambda sd: {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}  # noqa: E731
    save_file(half(pipe.transformer.state_dict()), str(out / "transformer.safetensors"))
    save_file(half(pipe.vae.state_dict()), str(out / "vae.safetensors"))
    save_file(text_encoder_state(pipe), str(out / "text_encoders.safetensors"))
    meta = {
        "model": dataclasses.asdict(cfg),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "vae_shift_factor": float(pipe.vae.config.shift_factor),
        "encoder_checksum": encoder_checksum(pipe),
        **(extra or {}),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2))


def load_config(path: Path = ASSET_DIR) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, full JSON)`` from ``path/config.json``."""
    meta = json.loads((Path(path) / "config.json").read_text())
    m = dict(meta["model"])
    m["vae_channels"] = tuple(m["vae_channels"])
    return ModelConfig(**m), meta


def weights_arch(path: str | Path) -> str:
    """Architecture of the shapes weights in ``path``: ``config.json``'s ``"arch"`` (``"sd3"`` when absent)."""
    return str(json.loads((Path(path) / "config.json").read_text()).get("arch", "sd3"))


def shapes_pipeline(device: str = "cpu", torch_dtype: torch.dtype = torch.float32,
                    path: str | Path | None = None, arch: str | None = None) -> Any:
    """The trained shapes-world pipeline from the shipped weights (no download).

    ``arch``: ``"sd3"`` (the default model, a ``StableDiffusion3Pipeline``) or ``"flux"`` (a ``FluxPipeline``
    from ``assets/shapes_flux/``, see :mod:`.flux_model`); with ``path`` and no ``arch`` the folder's
    ``config.json`` says which. Generate 64x64 images with ``pipe(prompt, **default_run_kwargs(pipe))``
    (the trained steps, guidance and T5 length, also in ``pipe.shapes_config``); ``max_sequence_length``
    must be the trained one.
    """
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"unknown shapes arch {arch!r}; use one of {ARCHS}")
    found = weights_arch(path) if path is not None else (arch or "sd3")
    if arch is not None and found != arch:
        raise ValueError(f"{path} holds a {found!r} shapes model, not {arch!r}: pass arch={found!r} or leave it out")
    if found == "flux":
        from .flux_model import flux_shapes_pipeline

        return flux_shapes_pipeline(path, device=device, torch_dtype=torch_dtype)
    if found != "sd3":
        raise ValueError(f"{path}/config.json names arch {found!r}; supported: {ARCHS}")
    root = Path(path) if path is not None else ASSET_DIR
    cfg, meta = load_config(root)
    transformer, vae = build_transformer(cfg), build_vae(cfg)
    transformer.load_state_dict({k: v.float() for k, v in load_file(str(root / "transformer.safetensors")).items()})
    vae.load_state_dict({k: v.float() for k, v in load_file(str(root / "vae.safetensors")).items()})
    vae.register_to_config(scaling_factor=meta["vae_scaling_factor"], shift_factor=meta["vae_shift_factor"])
    pipe = build_pipeline(cfg, transformer, vae)
    te = load_file(str(root / "text_encoders.safetensors"))
    for pre, m in (("te1.", pipe.text_encoder), ("te2.", pipe.text_encoder_2), ("te3.", pipe.text_encoder_3)):
        m.load_state_dict({k[len(pre):]: v for k, v in te.items() if k.startswith(pre)})
    got = encoder_checksum(pipe)
    if got != meta["encoder_checksum"]:
        raise RuntimeError("shapes text encoders/tokenizers do not match the shipped checksum "
                           f"({got[:12]} != {meta['encoder_checksum'][:12]}): tokenizers.py changed?")
    if torch_dtype != torch.float32:
        for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            m.to(dtype=torch_dtype)
    pipe.shapes_config = cfg  # type: ignore[attr-defined]
    pipe.shipped_run_kwargs = {  # type: ignore[attr-defined]  # read by default_run_kwargs() and describe()
        "num_inference_steps": cfg.default_steps, "guidance_scale": cfg.default_guidance,
        "max_sequence_length": cfg.max_sequence_length}
    return pipe.to(device)


def shapes_prompt_examples() -> list[str]:
    """Prompts that show the model (the last two use colour–shape pairs never seen in training)."""
    return [
        "a red circle", "a green square left of a yellow triangle", "a blue square above a yellow circle",
        "a yellow triangle right of a green circle", "a red triangle below a green square",
        "a blue circle left of a red square",
    ]


def default_pipeline(**kwargs: Any) -> StableDiffusion3Pipeline:
    """The embedded default model: the trained shapes pipeline (``kwargs`` go to :func:`shapes_pipeline`)
    when its weights are shipped, else the random tiny SD3 pipeline. Works offline, on CPU.

    Run it with ``pipe(prompt, **default_run_kwargs(pipe))``.
    """
    try:
        return shapes_pipeline(**kwargs)
    except (FileNotFoundError, WeightsNotAvailableError):
        pass  # weights not shipped in this checkout
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        warnings.warn(f"shapes model could not be loaded ({err}); using the random tiny pipeline", stacklevel=2)
    pipe = tiny_sd3_pipeline(**{k: v for k, v in kwargs.items() if k in ("device", "torch_dtype")})
    pipe.shipped_run_kwargs = dict(TINY_RUN_KWARGS)  # type: ignore[attr-defined]
    return pipe


def default_run_kwargs(pipe: Any, embedded: bool = True) -> dict[str, Any]:
    """``num_inference_steps``, ``guidance_scale`` and ``max_sequence_length`` that suit ``pipe``: those
    it ships with (``pipe.shipped_run_kwargs``, set by :func:`shapes_pipeline` / :func:`default_pipeline`),
    else :data:`TINY_RUN_KWARGS` for ``embedded`` (tiny) pipelines, :data:`SD3_RUN_KWARGS` for real SD3 checkpoints
    and nothing (the pipeline's own defaults) for other families' checkpoints."""
    shipped = getattr(pipe, "shipped_run_kwargs", None)
    if shipped:
        return dict(shipped)
    if not embedded and resolve_family(pipe).name != "sd3":
        return {}  # another family's checkpoint: its pipeline's own call defaults
    return dict(TINY_RUN_KWARGS if embedded else SD3_RUN_KWARGS)

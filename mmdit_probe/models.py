"""Building and loading SD3 / SD3.5 pipelines.

* :func:`tiny_sd3_pipeline` builds a complete, randomly initialised (or partly supplied)
  ``StableDiffusion3Pipeline`` entirely in code: no download, deterministic from ``seed``.
* :func:`load_pipeline` loads real weights with ``from_pretrained`` and turns every
  "weights are not here" failure into :class:`WeightsNotAvailableError` with instructions.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


class _NoTorchvisionFallbackNote(logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil`" note: SD3 pipelines import CLIP/SigLIP image processors they never use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


@contextlib.contextmanager
def _quiet_image_processor_fallback() -> Iterator[None]:
    """Filter only that note, only on the logger that emits it, only while the pipelines are imported."""
    log = logging.getLogger("transformers.utils.import_utils")
    note = _NoTorchvisionFallbackNote()
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


with _quiet_image_processor_fallback():  # the pipeline module imports transformers' image processors
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        DiffusionPipeline,
        StableDiffusion3Pipeline,
    )
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .tokenizers import DEFAULT_VOCAB, make_clip_tokenizer, make_t5_tokenizer, normalize_words

__all__ = [
    "VARIANTS",
    "TINY_NAMES",
    "WeightsNotAvailableError",
    "how_to_get",
    "tiny_sd3_pipeline",
    "load_pipeline",
]

VARIANTS: tuple[str, ...] = ("sd3", "sd35")
TINY_NAMES: dict[str, str] = {"tiny": "sd3", "tiny-sd3": "sd3", "tiny-sd35": "sd35"}

# Tiny text-encoder / VAE sizes (the transformer's are keyword arguments of tiny_sd3_pipeline).
JOINT_ATTENTION_DIM = 32  # = T5 d_model; CLIP-L + CLIP-G hidden states (16 + 16) are zero-padded to it
POOLED_PROJECTION_DIM = 64  # = CLIP-L + CLIP-G projection_dim (32 + 32)
VAE_BLOCK_OUT_CHANNELS = (8, 16)  # -> vae_scale_factor 2
VAE_LATENT_CHANNELS = 16
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


class WeightsNotAvailableError(RuntimeError):
    """The requested pipeline weights are not on this machine (offline, not cached, gated, bad path).

    ``problem`` says what is missing and why; ``str(err)`` adds :func:`how_to_get` instructions phrased
    for Python. ``model`` is the hub id (None for a local path), for re-phrasing them (e.g. for a CLI flag).
    """

    def __init__(self, problem: str, model: str | None = None):
        super().__init__(f"{problem}\n{how_to_get(model)}")
        self.problem, self.model = problem, model


def _seed_component(seed: int, index: int) -> None:
    """Seed the global RNG for component ``index`` (distinct streams per component and seed)."""
    torch.manual_seed(seed * 16 + index)


def _tiny_transformer(
    variant: str, *, num_layers: int, num_heads: int, head_dim: int, sample_size: int, patch_size: int,
    in_channels: int, pos_embed_max_size: int,
) -> SD3Transformer2DModel:
    sd35 = variant == "sd35"
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, out_channels=in_channels,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
        joint_attention_dim=JOINT_ATTENTION_DIM, caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=POOLED_PROJECTION_DIM, pos_embed_max_size=pos_embed_max_size,
        dual_attention_layers=tuple(range(num_layers // 2)) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    )


def _tiny_vae(latent_channels: int) -> AutoencoderKL:
    n = len(VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=VAE_BLOCK_OUT_CHANNELS, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=SD3_VAE_SCALE,
        shift_factor=SD3_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
    )


def _tiny_clip(
    vocab_size: int, bos_id: int, eos_id: int, pad_id: int, hidden: int, proj: int
) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=proj,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu",
        attention_dropout=0.0, bos_token_id=bos_id,
        eos_token_id=eos_id,  # pooled output is taken at the first eos
        pad_token_id=pad_id,
    )
    return CLIPTextModelWithProjection(config)


def _tiny_t5(vocab_size: int, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config)


def tiny_sd3_pipeline(
    variant: str = "sd3",
    seed: int = 0,
    *,
    num_layers: int = 4,
    num_heads: int = 4,
    head_dim: int = 8,
    sample_size: int = 16,
    patch_size: int = 2,
    pos_embed_max_size: int = 64,
    vocab: Sequence[str] | None = None,
    with_t5: bool = True,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    transformer: SD3Transformer2DModel | None = None,
    vae: AutoencoderKL | None = None,
) -> StableDiffusion3Pipeline:
    """Build a tiny, randomly initialised SD3 (``"sd3"``) or SD3.5 (``"sd35"``) pipeline in code.

    Every component is built after seeding torch from ``seed`` (the caller's RNG state is
    restored afterwards), so equal arguments give bitwise-equal weights. ``sd35`` adds
    ``qk_norm="rms_norm"`` and dual attention (``attn2``) in the first ``num_layers // 2`` blocks.
    ``sample_size`` is in latent pixels; with the tiny VAE (scale factor 2) the default image is
    32x32 px = 64 image tokens. Text tokens = 77 (CLIP) + ``max_sequence_length`` (T5).
    ``vocab`` replaces the default word list of all three tokenizers. ``transformer`` / ``vae``
    replace the generated ones (e.g. a trained model); the text encoders are then sized from the
    transformer's ``joint_attention_dim`` and ``pooled_projection_dim``. ``with_t5=False`` leaves
    ``text_encoder_3``/``tokenizer_3`` as ``None`` (the pipeline then feeds zeros for T5).
    All modules, supplied ones included, are put in eval mode and cast to ``torch_dtype``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants are {', '.join(map(repr, VARIANTS))}")
    if num_layers < 1 or num_heads < 1 or head_dim < 1:
        raise ValueError("num_layers, num_heads and head_dim must be positive")
    words = normalize_words(DEFAULT_VOCAB if vocab is None else vocab)

    latent_channels = vae.config.latent_channels if vae is not None else VAE_LATENT_CHANNELS
    if transformer is not None:
        tcfg = transformer.config
        if tcfg.in_channels != latent_channels:
            raise ValueError(f"transformer.in_channels={tcfg.in_channels} != VAE latent_channels={latent_channels}")
        joint_dim, pooled_dim = tcfg.joint_attention_dim, tcfg.pooled_projection_dim
    else:
        joint_dim, pooled_dim = JOINT_ATTENTION_DIM, POOLED_PROJECTION_DIM
    if pooled_dim % 2 or joint_dim < 2:
        raise ValueError("pooled_projection_dim must be even and joint_attention_dim >= 2")
    clip_hidden = joint_dim // 2  # CLIP-L + CLIP-G hidden states are concatenated, then padded to joint_dim
    if clip_hidden % 2:
        clip_hidden -= 1  # two attention heads

    tokenizer = make_clip_tokenizer(words, model_max_length=CLIP_MAX_LENGTH)
    tokenizer_2 = make_clip_tokenizer(words, pad_token="!", model_max_length=CLIP_MAX_LENGTH)
    tokenizer_3 = make_t5_tokenizer(words, model_max_length=T5_MAX_LENGTH) if with_t5 else None

    with torch.random.fork_rng(devices=[]):
        if transformer is None:
            _seed_component(seed, 0)
            transformer = _tiny_transformer(
                variant, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim, sample_size=sample_size,
                patch_size=patch_size, in_channels=latent_channels, pos_embed_max_size=pos_embed_max_size,
            )
        if vae is None:
            _seed_component(seed, 1)
            vae = _tiny_vae(latent_channels)
        encoders = []
        for index, tok in ((2, tokenizer), (3, tokenizer_2)):
            _seed_component(seed, index)
            encoders.append(_tiny_clip(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                       clip_hidden, pooled_dim // 2))
        text_encoder_3 = None
        if with_t5:
            _seed_component(seed, 4)
            text_encoder_3 = _tiny_t5(len(tokenizer_3), joint_dim)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # like from_pretrained; T5/CLIP would otherwise run with dropout
            if torch_dtype != torch.float32:
                module.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# --------------------------------------------------------------------------------------------- loading


def how_to_get(model: str | None, flag: str | None = None) -> str:
    """How to get the weights of hub id ``model`` (None: generic, for local paths), phrased for Python,
    or for a command line whose option ``flag`` (e.g. ``"--model"``) takes the model."""
    repo = model or "<repo-id>"
    target = f"./{model.rstrip('/').split('/')[-1]}" if model else "./<dir>"
    folder = f"/path/to/{target[2:]}"
    pass_it = f"{flag} {folder}" if flag else f"load_pipeline('{folder}')"
    no_weights = (f"{flag} tiny or {flag} tiny-sd35 (random tiny SD3 / SD3.5), or {flag} default (the embedded "
                  "trained shapes model)" if flag else
                  "mmdit_probe.tiny_sd3_pipeline() (or load_pipeline('tiny-sd3') / load_pipeline('tiny-sd35'))")
    return (
        "To get the weights:\n"
        f"  1. on a machine with internet (for stabilityai models: after accepting the licence on "
        f"https://huggingface.co/{repo} and `hf auth login`), run\n"
        f"       huggingface-cli download {repo} --local-dir {target}\n"
        f"     (newer huggingface_hub: `hf download {repo} --local-dir {target}`);\n"
        f"  2. copy that folder to this machine and pass its path: {pass_it};\n"
        "  or set HF_HOME / HF_HUB_CACHE to a Hugging Face cache that already contains the model.\n"
        f"For offline experiments without any weights use {no_weights}."
    )


def _env_offline() -> bool:
    """True when HF_HUB_OFFLINE / DIFFUSERS_OFFLINE is set now (huggingface_hub reads it only at import)."""
    import huggingface_hub.constants as hf_constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("DIFFUSERS_OFFLINE", ""))
    return bool(hf_constants.HF_HUB_OFFLINE) or any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _looks_like_path(model: str) -> bool:
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep != "/" and os.sep in model
        or os.path.exists(model)
    )


def _check_local_folder(path: Path) -> None:
    if not path.exists():
        raise WeightsNotAvailableError(f"Local model path {str(path)!r} does not exist.")
    if path.is_file() or not (path / "model_index.json").is_file():
        hint = ""
        if path.is_file() and path.suffix in {".safetensors", ".ckpt", ".pt", ".bin"}:
            hint = (" It is a single-file checkpoint: load it with "
                    "StableDiffusion3Pipeline.from_single_file(...) or convert it to a diffusers folder.")
        elif path.is_dir():
            names = sorted(p.name for p in path.iterdir())[:12]
            hint = f" It contains: {names}."
        raise WeightsNotAvailableError(
            f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json).{hint} Pass the folder "
            "created by `huggingface-cli download <repo> --local-dir <dir>` or by pipe.save_pretrained(<dir>)."
        )


def load_pipeline(
    model: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Load an SD3 / SD3.5 / Flux.1 pipeline from a hub id, a local diffusers folder, or a tiny name.

    ``"tiny"``/``"tiny-sd3"``/``"tiny-sd35"`` return :func:`tiny_sd3_pipeline` (``kwargs`` go to it;
    for ``"tiny"``, ``variant`` may pick ``"sd3"``/``"sd35"``). Otherwise ``variant`` is the diffusers
    weight variant (e.g. ``"fp16"``) and ``kwargs`` go to ``DiffusionPipeline.from_pretrained`` (the
    folder's ``model_index.json`` names the pipeline class).
    ``local_files_only=None`` means "only if HF_HUB_OFFLINE/DIFFUSERS_OFFLINE is set".
    Raises :class:`WeightsNotAvailableError` (chained to the original error) when the weights
    cannot be found or fetched.
    """
    name = os.fspath(model)
    if isinstance(name, bytes):
        name = name.decode()
    if name.lower() in TINY_NAMES:
        tiny_variant = TINY_NAMES[name.lower()]
        if variant is not None and variant != tiny_variant:
            if name.lower() != "tiny" or variant not in VARIANTS:
                raise ValueError(f"variant {variant!r} conflicts with {name!r}; valid variants are {VARIANTS}")
            tiny_variant = variant
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        if device is not None:
            kwargs["device"] = device
        return tiny_sd3_pipeline(tiny_variant, **kwargs)

    if local_files_only is None:
        local_files_only = _env_offline()
    is_local = _looks_like_path(name)
    if is_local:
        _check_local_folder(Path(name).expanduser())
        name = str(Path(name).expanduser())

    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    not_available: tuple[type[BaseException], ...] = (
        GatedRepoError, RepositoryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        HFValidationError, OSError, ConnectionError, TimeoutError,
    )
    load_kwargs = dict(kwargs)
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype  # diffusers >= 0.42 deprecates from_pretrained(torch_dtype=)
    if variant is not None:
        load_kwargs["variant"] = variant
    try:
        pipe = DiffusionPipeline.from_pretrained(name, local_files_only=local_files_only, **load_kwargs)
    except not_available as err:
        if isinstance(err, GatedRepoError):
            why = "the repository is gated and this machine has no access (accept the licence and log in)"
        elif isinstance(err, RepositoryNotFoundError):
            why = "the repository was not found (wrong id, private, or gated without login)"
        elif is_local:
            why = f"the local folder is incomplete or unreadable ({type(err).__name__}: {err})"
        elif local_files_only:
            why = "offline mode is on (HF_HUB_OFFLINE / local_files_only) and the model is not in the local cache"
        else:
            why = f"it could not be downloaded or found in the cache ({type(err).__name__}: {err})"
        raise WeightsNotAvailableError(f"Weights for {name!r} are not available: {why}.",
                                       None if is_local else name) from err
    if device is not None:
        pipe = pipe.to(device)
    return pipe

"""Benchmark: cost of recording vs. the unhooked transformer, in one process, same model and inputs.

    python benchmarks/bench_recording.py --preset cpu-small            # here, a few minutes
    python benchmarks/bench_recording.py --preset sd35-medium-1024     # GPU: SD3.5-medium-sized random weights, bf16
    python benchmarks/bench_recording.py --preset flux-dev-1024        # GPU: Flux.1-dev-sized random weights, bf16
    python benchmarks/bench_recording.py --preset cpu-flux-small       # the Flux code path here, a few minutes

Times the transformer calls of a full sampling loop (Euler steps on random latents; SD3 with CFG
batch 2, Flux guidance-distilled batch 1) and reports median wall time and peak memory (CUDA: max allocated; CPU: peak RSS
above the mode's starting RSS, sampled every 2 ms) for: vanilla, default recording, +groups,
+word maps (all layers), +entropy & key-column mass, and an eager baseline that materialises
softmax(QKᵀ) per layer the way peer tools do. Prints a table of ratios against vanilla and
writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mmdit_probe as mp  # noqa: E402
from eager_baseline import EagerFluxMapsProcessor, EagerMapsProcessor  # noqa: E402
from mmdit_probe.tokenizers import make_clip_tokenizer, make_t5_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Preset:
    family: str  # "sd3" or "flux"
    num_layers: int  # SD3: joint blocks; Flux: double-stream blocks
    heads: int
    head_dim: int
    latent: int  # latent height = width
    t5_len: int
    steps: int
    dual_layers: tuple[int, ...]
    qk_norm: str | None
    joint_attention_dim: int
    pooled: int
    dtype: str
    repeats: int
    single_layers: int = 0  # Flux: single-stream blocks


PRESETS = {
    "cpu-small": Preset("sd3", 6, 6, 32, 64, 32, 4, (0, 1, 2), "rms_norm", 256, 256, "float32", 3),
    "sd35-medium-1024": Preset("sd3", 24, 24, 64, 128, 256, 28, tuple(range(13)), "rms_norm", 4096, 2048, "bfloat16", 3),
    # Flux.1-dev: 19 double- + 38 single-stream blocks, 24 × 128 heads, 512 T5 tokens, 1024² = 64×64 packed tokens
    "flux-dev-1024": Preset("flux", 19, 24, 128, 128, 512, 28, (), "rms_norm", 4096, 768, "bfloat16", 3, 38),
    "cpu-flux-small": Preset("flux", 3, 6, 32, 64, 32, 4, (), "rms_norm", 256, 256, "float32", 3, 6),
}
PROMPT = "a red circle left of a blue square"


def build(preset: Preset, device: str):
    return (build_flux if preset.family == "flux" else build_sd3)(preset, device)


@contextlib.contextmanager
def initialising(device: str, dtype: torch.dtype):
    """Create parameters directly on ``device`` in ``dtype`` (a 12 B-parameter fp32 init on CPU takes minutes)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_flux(preset: Preset, device: str):
    """Flux.1-architecture transformer (random weights), inputs of one guidance-distilled row, T5-only layouts."""
    from diffusers import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    torch.manual_seed(0)
    dt = getattr(torch, preset.dtype)
    with initialising(device, dt):
        tr = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=preset.num_layers, num_single_layers=preset.single_layers,
            attention_head_dim=preset.head_dim, num_attention_heads=preset.heads,
            joint_attention_dim=preset.joint_attention_dim, pooled_projection_dim=preset.pooled, guidance_embeds=True,
            axes_dims_rope=(preset.head_dim // 8, 7 * preset.head_dim // 16, 7 * preset.head_dim // 16),
        )
    tr = tr.to(dtype=dt).eval()
    g = torch.Generator().manual_seed(1)
    side = preset.latent // 2  # packed 2×2
    inputs = dict(
        latents=torch.randn(1, side * side, 64, generator=g).to(device, dt),
        ehs=torch.randn(1, preset.t5_len, preset.joint_attention_dim, generator=g).to(device, dt),
        pooled=torch.randn(1, preset.pooled, generator=g).to(device, dt),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, side, side, device, dt),
        txt_ids=torch.zeros(preset.t5_len, 3, device=device, dtype=dt),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32),
    )
    t5 = make_t5_tokenizer()
    layouts = [mp.TokenLayout.from_t5_ids((side, side), t5(PROMPT, padding="max_length", max_length=preset.t5_len,
                                                              truncation=True).input_ids, t5, order=("text", "image"),
                                          prompt=PROMPT)]
    return tr, inputs, layouts


def build_sd3(preset: Preset, device: str):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with initialising(device, getattr(torch, preset.dtype)):
        tr = SD3Transformer2DModel(
            sample_size=preset.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=preset.num_layers,
            attention_head_dim=preset.head_dim, num_attention_heads=preset.heads,
            joint_attention_dim=preset.joint_attention_dim, caption_projection_dim=preset.heads * preset.head_dim,
            pooled_projection_dim=preset.pooled, pos_embed_max_size=max(preset.latent // 2, 96),
            dual_attention_layers=preset.dual_layers, qk_norm=preset.qk_norm,
        )
    tr = tr.to(device=device, dtype=getattr(torch, preset.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, preset.dtype)
    n_text = 77 + preset.t5_len
    inputs = dict(
        latents=torch.randn(2, 16, preset.latent, preset.latent, generator=g).to(device, dt),
        ehs=torch.randn(2, n_text, preset.joint_attention_dim, generator=g).to(device, dt),
        pooled=torch.randn(2, preset.pooled, generator=g).to(device, dt),
    )
    clip, t5 = make_clip_tokenizer(), make_t5_tokenizer()
    grid = (preset.latent // 2, preset.latent // 2)
    layouts = [
        mp.TokenLayout.from_ids(grid, clip(p, padding="max_length", max_length=77).input_ids, clip,
                                t5(p, padding="max_length", max_length=preset.t5_len, truncation=True).input_ids, t5)
        for p in ("", PROMPT)
    ]
    return tr, inputs, layouts


def sample(tr, inputs, steps: int):
    """Euler flow-matching loop over ``steps`` transformer calls (SD3: CFG batch 2; Flux: one row)."""
    x = inputs["latents"].clone()
    flux = "img_ids" in inputs
    with torch.no_grad():
        for i in range(steps):
            sigma = 1.0 - i / steps
            if flux:  # Flux takes the timestep in [0, 1]
                t = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
                v = tr(x, inputs["ehs"], inputs["pooled"], t, inputs["img_ids"], inputs["txt_ids"],
                       inputs["guidance"]).sample
            else:
                t = torch.full((x.shape[0],), sigma * 1000, device=x.device, dtype=x.dtype)
                v = tr(x, inputs["ehs"], inputs["pooled"], t).sample
            x = x - v * (1.0 / steps)
    return x


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` is bytes above the start."""

    def __init__(self):
        self.start = self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.start = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.start)


def modes(tr, layouts):
    words = ("red", "circle", "blue", "square")
    branches = ["uncond", "cond"][-len(layouts):]
    return {
        "vanilla": None,
        "default (quadrant mass)": lambda: mp.AttentionRecorder(tr, branches=branches),
        "+ text-group masses": lambda: mp.AttentionRecorder(tr, groups=True, layout=layouts, branches=branches),
        "+ word maps (all layers)": lambda: mp.AttentionRecorder(tr, groups=True, words=words, layout=layouts,
                                                               branches=branches),
        "+ entropy & key-column mass": lambda: mp.AttentionRecorder(tr, groups=True, words=words, entropy=True,
                                                                  key_mass=True, layout=layouts, branches=branches),
        "eager N×N baseline (peer tools)": "eager",
    }


def run_once(tr, inputs, preset, factory, device) -> tuple[float, int]:
    """One sampling run under ``factory``: (seconds, peak bytes)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        if factory is None:
            sample(tr, inputs, preset.steps)
        elif factory == "eager":
            with (EagerFluxMapsProcessor if "img_ids" in inputs else EagerMapsProcessor).installed(tr):
                sample(tr, inputs, preset.steps)
        else:
            with factory() as rec:
                sample(tr, inputs, preset.steps)
            rec.result  # noqa: B018 - gathering the result is part of the cost
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base_mem if device == "cuda" else rss.peak
    return seconds, peak


def run_all(tr, inputs, preset, factories: dict, device) -> dict:
    """Round-robin over modes for each repeat, so drift in machine load hits every mode alike."""
    times = {n: [] for n in factories}
    peaks = {n: [] for n in factories}
    errors: dict[str, str] = {}
    for _ in range(preset.repeats):
        for name, factory in factories.items():
            if name in errors:
                continue
            try:
                s, p = run_once(tr, inputs, preset, factory, device)
                times[name].append(s)
                peaks[name].append(p)
            except torch.OutOfMemoryError as err:
                errors[name] = f"out of memory: {str(err).splitlines()[0][:120]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
    return {n: {"median_s": statistics.median(times[n]) if times[n] else None,
                "peak_bytes": max(peaks[n]) if peaks[n] else None, "error": errors.get(n), "runs": len(times[n])}
            for n in factories}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    ap.add_argument("--skip-eager", action="store_true")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.steps:
        preset = Preset(**{**asdict(preset), "steps": args.steps})
    tr, inputs, layouts = build(preset, args.device)
    sample(tr, inputs, 1)  # warm-up
    factories = {n: f for n, f in modes(tr, layouts).items() if not (f == "eager" and args.skip_eager)}
    rows = run_all(tr, inputs, preset, factories, args.device)
    base = rows["vanilla"]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    n_img = (preset.latent // 2) ** 2
    flux = preset.family == "flux"
    layers = f"{preset.num_layers} double + {preset.single_layers} single" if flux else f"{preset.num_layers}"
    print(f"\n{args.preset} on {device_name}: {layers} layers, {preset.heads}×{preset.head_dim} heads, "
          f"{n_img} image + {preset.t5_len + (0 if flux else 77)} text tokens, batch {1 if flux else 2}, "
          f"{preset.steps} steps, {preset.dtype}")
    print("| mode | median s | × time | peak MiB | × memory |\n|---|---|---|---|---|")
    for name, r in rows.items():
        if r["error"]:
            print(f"| {name} | — | {r['error']} | — | — |")
            continue
        tr_ = r["median_s"] / base["median_s"]
        mem = r["peak_bytes"] / 2**20
        mr = (r["peak_bytes"] / base["peak_bytes"]) if base["peak_bytes"] else float("nan")
        r.update(time_ratio=tr_, memory_ratio=mr)
        print(f"| {name} | {r['median_s']:.3f} | {tr_:.3f} | {mem:.1f} | {mr:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.preset}-{args.device}.json"
    path.write_text(json.dumps({"preset": args.preset, "config": asdict(preset), "device": device_name,
                                "torch": torch.__version__, "modes": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The probe processor and the per-model controller that swaps it in and out.

:class:`ProbeProcessor` computes exactly what diffusers' ``JointAttnProcessor2_0`` computes (same
ops, same order, same kernel) and shows the per-head ``q, k, v``, output and log-sum-exp to
*observers* (the recorder) and lets *edits* (ablations) change them. :class:`ProbeController`
installs one per attention module of a transformer, counts transformer calls, and puts the
original processors back when its last user leaves — also after an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from .layout import joint_order, stream_slices
from .stats import attention_with_lse, default_scale

ATTENTIONS = ("attn", "attn2")


@dataclass(frozen=True)
class Site:
    """One attention module: block index and ``"attn"`` / ``"attn2"``. ``name`` is its stable hook name."""

    layer: int
    attention: str

    @property
    def name(self) -> str:
        return f"transformer_blocks.{self.layer}.{self.attention}"


@dataclass(frozen=True)
class AttentionCall:
    """Context of one attention call, passed to observers and edits."""

    site: Site
    call: int  # transformer call index since the controller was installed
    n_image: int
    n_text: int  # 0 for the image-only attn2
    order: tuple[str, str]
    scale: float
    heads: int

    @property
    def image_slice(self) -> slice:
        return stream_slices(self.order, self.n_image, self.n_text)["image"]

    @property
    def text_slice(self) -> slice:
        return stream_slices(self.order, self.n_image, self.n_text)["text"]


class Observer(Protocol):
    def observe(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor, lse: torch.Tensor) -> None: ...


class ProbeProcessor:
    """Drop-in for ``JointAttnProcessor2_0`` with observer and edit points.

    Edits are objects with any of: ``edit_qkv(call, q, k, v) -> (q, k, v)``,
    ``edit_attention(call, q, k, v, out, lse) -> (out, lse)``, ``edit_heads(call, out) -> out``
    (``out [B, H, N, D]`` before the heads are merged), ``edit_streams(call, image, text) ->
    (image, text)`` on the projected outputs, and ``observed_qk(call, q, k) -> (q, k)``: the ``q, k``
    observers see (edits that restrict which keys a query may attend to encode that restriction
    there, so recorded statistics describe the edited attention; the kernel never sees them).
    """

    def __init__(self, site: Site, controller: "ProbeController"):
        self.site = site
        self.controller = controller
        self.observers: list[Observer] = []
        self.edits: list[Any] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_text = 0
        order = self.controller.order
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            n_text = eq.shape[2]
            streams = {"image": (query, key, value), "text": (eq, ek, ev)}
            query, key, value = (torch.cat([streams[s][i] for s in order], dim=2) for i in range(3))

        call = AttentionCall(self.site, self.controller.call_index, residual.shape[1], n_text, order,
                             default_scale(query), attn.heads)
        for edit in self.edits:
            if hasattr(edit, "edit_qkv"):
                query, key, value = edit.edit_qkv(call, query, key, value)

        needs_lse = bool(self.observers) or any(hasattr(e, "edit_attention") for e in self.edits)
        if needs_lse:
            out, lse = attention_with_lse(query, key, value)
            for edit in self.edits:
                if hasattr(edit, "edit_attention"):
                    out, lse = edit.edit_attention(call, query, key, value, out, lse)
            if self.observers:
                obs_q, obs_k = query, key
                for edit in self.edits:
                    if hasattr(edit, "observed_qk"):
                        obs_q, obs_k = edit.observed_qk(call, obs_q, obs_k)
                for obs in self.observers:
                    obs.observe(call, obs_q, obs_k, value, out, lse)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        for edit in self.edits:
            if hasattr(edit, "edit_heads"):
                out = edit.edit_heads(call, out)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            parts = stream_slices(order, residual.shape[1], n_text)
            hidden_states, encoder_hidden_states = hidden_states[:, parts["image"]], hidden_states[:, parts["text"]]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        for edit in self.edits:
            if hasattr(edit, "edit_streams"):
                hidden_states, encoder_hidden_states = edit.edit_streams(call, hidden_states, encoder_hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def resolve_transformer(model: Any) -> torch.nn.Module:
    """The MMDiT inside ``model`` (a pipeline or the transformer itself), or a ``TypeError`` naming the fix."""
    candidate = getattr(model, "transformer", model)
    blocks = getattr(candidate, "transformer_blocks", None)
    if isinstance(candidate, torch.nn.Module) and blocks is not None and len(blocks) > 0 and all(
        type(b).__name__ == "JointTransformerBlock" for b in blocks
    ):
        return candidate
    raise TypeError(
        f"mmdit_probe needs an SD3-style MMDiT (a StableDiffusion3Pipeline or an SD3Transformer2DModel whose "
        f"transformer_blocks are JointTransformerBlocks); got {type(model).__name__}. Pass the pipeline or "
        f"pipe.transformer of an SD3/SD3.5 model, e.g. mmdit_probe.tiny_sd3_pipeline()."
    )


def model_sites(transformer: torch.nn.Module) -> list[Site]:
    """Every attention module that takes part in joint attention, in block order."""
    sites = []
    for i, block in enumerate(transformer.transformer_blocks):
        sites.append(Site(i, "attn"))
        if getattr(block, "attn2", None) is not None:
            sites.append(Site(i, "attn2"))
    return sites


@dataclass(frozen=True)
class CallInfo:
    """What the transformer was called with: ``timestep`` (first row), batch, latent and text sizes."""

    call: int
    timestep: torch.Tensor  # 0-d, on the model's device (no sync inside the loop)
    batch: int
    latent_hw: tuple[int, int]
    n_text: int


class ProbeController:
    """Owns the probe processors of one transformer while at least one user is attached.

    Users (recorders, interventions) call :meth:`acquire` / :meth:`release`; the first installs
    the processors and a call-counting hook, the last restores the original processors.
    """

    _ATTR = "_mmdit_probe_controller"

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.order = joint_order(transformer)
        self.sites = model_sites(transformer)
        self.processors: dict[str, ProbeProcessor] = {}
        self.call_index = -1
        self.last_call: CallInfo | None = None
        self._users: list[Any] = []
        self._originals: dict[str, Any] = {}
        self._hooks: list[Any] = []
        self._call_listeners: list[Callable[[CallInfo], None]] = []
        self._output_listeners: list[Callable[[CallInfo, Any], None]] = []

    @classmethod
    def of(cls, model: Any) -> "ProbeController":
        """The controller of ``model``'s transformer (created on first use)."""
        tr = resolve_transformer(model)
        ctl = tr.__dict__.get(cls._ATTR)
        if ctl is None:
            ctl = cls(tr)
            tr.__dict__[cls._ATTR] = ctl
        return ctl

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    def acquire(self, user: Any) -> None:
        if any(u is user for u in self._users):
            raise RuntimeError(f"{type(user).__name__} is already active on this model; exit it before entering again")
        if not self._users:
            self._install()
        self._users.append(user)

    def release(self, user: Any) -> None:
        self._users = [u for u in self._users if u is not user]
        for p in self.processors.values():
            p.observers = [o for o in p.observers if getattr(o, "owner", None) is not user]
            p.edits = [e for e in p.edits if getattr(e, "owner", None) is not user]
        if not self._users:
            self._uninstall()

    def users(self, kind: type | None = None) -> list[Any]:
        return [u for u in self._users if kind is None or isinstance(u, kind)]

    def add_call_listener(self, fn: Callable[[CallInfo], None]) -> None:
        self._call_listeners.append(fn)

    def add_output_listener(self, fn: Callable[[CallInfo, Any], None]) -> None:
        self._output_listeners.append(fn)

    def remove_listener(self, fn: Callable) -> None:
        self._call_listeners = [f for f in self._call_listeners if f is not fn]
        self._output_listeners = [f for f in self._output_listeners if f is not fn]

    # ---- installation -----------------------------------------------------------------
    def _install(self) -> None:
        originals = dict(self.transformer.attn_processors)
        wrong = {k: type(v).__name__ for k, v in originals.items() if type(v) is not JointAttnProcessor2_0}
        if wrong:
            first = next(iter(wrong.items()))
            raise TypeError(
                f"mmdit_probe replaces JointAttnProcessor2_0 only, but {first[0]} uses {first[1]} "
                f"({len(wrong)} modules differ). Reset them with transformer.set_attn_processor(JointAttnProcessor2_0()) "
                f"or remove the adapter that installed them."
            )
        self._originals = originals
        self.processors = {f"{s.name}.processor": ProbeProcessor(s, self) for s in self.sites}
        missing = set(originals) - set(self.processors)
        if missing:
            raise TypeError(f"unexpected attention processors {sorted(missing)[:3]}; is this an SD3 MMDiT?")
        self.transformer.set_attn_processor(dict(self.processors))
        self._hooks = [
            self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.transformer.register_forward_hook(self._post_hook, with_kwargs=True),
        ]
        self.call_index = -1

    def _uninstall(self) -> None:
        try:
            if self._originals:
                self.transformer.set_attn_processor(dict(self._originals))
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks, self._originals, self.processors = [], {}, {}
            self._call_listeners, self._output_listeners = [], []
            self.transformer.__dict__.pop(self._ATTR, None)

    def _pre_hook(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        self.call_index += 1
        timestep = t.reshape(-1)[0].detach() if torch.is_tensor(t) else torch.tensor(float("nan") if t is None else float(t))
        p = self.transformer.config.patch_size
        info = CallInfo(self.call_index, timestep, hs.shape[0], (hs.shape[-2] // p, hs.shape[-1] // p),
                        0 if ehs is None else ehs.shape[1])
        self.last_call = info
        for fn in list(self._call_listeners):
            fn(info)
        return None

    def _post_hook(self, module, args, kwargs, output):
        for fn in list(self._output_listeners):
            fn(self.last_call, output)
        return None

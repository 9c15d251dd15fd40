"""What peer attention-map tools do: materialise softmax(QKᵀ) per layer and keep a map per layer-step."""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0


class EagerMapsProcessor:
    """Explicit ``softmax(q·kᵀ/√d)`` (N×N per head) and a head-mean map stored per call."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b = hidden_states.shape[0]
        split = lambda x: x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        self.store.append(probs.mean(1))  # the per-layer-step map peers keep
        out = (probs @ v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        n = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            img, txt = out[:, :n], out[:, n:]
            txt = txt if attn.context_pre_only else attn.to_add_out(txt)
            return attn.to_out[1](attn.to_out[0](img)), txt
        return attn.to_out[1](attn.to_out[0](out))

    @classmethod
    def installed(cls, transformer):
        return _installed(cls, transformer, JointAttnProcessor2_0)


class EagerFluxMapsProcessor:
    """The same for Flux.1 (double- and single-stream blocks): explicit N×N softmax over ``[text, image]``."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        split = lambda x: x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731  [B, H, S, D]
        q, k, v = attn.norm_q(split(attn.to_q(hidden_states))), attn.norm_k(split(attn.to_k(hidden_states))), \
            split(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
            ev = split(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        if image_rotary_emb is not None:
            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        self.store.append(probs.mean(1))
        out = (probs @ v).transpose(1, 2).flatten(2).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        n_txt = encoder_hidden_states.shape[1]
        txt, img = out[:, :n_txt], out[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)

    @classmethod
    def installed(cls, transformer):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return _installed(cls, transformer, FluxAttnProcessor)


@contextlib.contextmanager
def _installed(cls, transformer, original_type):
    """``cls(store)`` in every attention module for the block; the originals (``original_type``) restored after."""
    originals = dict(transformer.attn_processors)
    store: list = []
    transformer.set_attn_processor({k: cls(store) for k in originals})
    try:
        yield store
    finally:
        transformer.set_attn_processor(dict(originals))
        assert all(type(p) is original_type for p in transformer.attn_processors.values())

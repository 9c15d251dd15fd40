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
    @contextlib.contextmanager
    def installed(cls, transformer):
        originals = dict(transformer.attn_processors)
        store: list = []
        transformer.set_attn_processor({k: cls(store) for k in originals})
        try:
            yield store
        finally:
            transformer.set_attn_processor(dict(originals))
            assert all(type(p) is JointAttnProcessor2_0 for p in transformer.attn_processors.values())

"""Independent reference: explicit fp64 softmax from the model's own projections.

Captures what every attention module receives (a forward pre-hook, which does not change the
computation) and recomputes ``softmax(q·kᵀ/√d)`` over the joint ``[image ; text]`` sequence in
float64, applying the qk RMS-norms the way diffusers' processor does.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def kernel_inputs(transformer, masks: bool = False):
    """Every ``(q, k)`` ``[B, H, S, D]`` (with ``masks``: ``(q, k, attn_mask or None)``) the attention kernel
    (``F.scaled_dot_product_attention``) receives inside ``transformer``'s forward (the text encoders use it too)."""
    seen, active = [], {"on": False}
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        if active["on"]:
            q = kwargs.get("query", args[0] if args else None)
            k = kwargs.get("key", args[1] if len(args) > 1 else None)
            item = (q.detach().clone(), k.detach().clone())
            if masks:
                mask = kwargs.get("attn_mask")
                item += (None if mask is None else mask.detach().clone(),)
            seen.append(item)
        return real(*args, **kwargs)

    hooks = [transformer.register_forward_pre_hook(lambda *a: active.__setitem__("on", True)),
             transformer.register_forward_hook(lambda *a: active.__setitem__("on", False))]
    try:
        with mock.patch("torch.nn.functional.scaled_dot_product_attention", spy):
            yield seen
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def capture_attention_inputs(transformer):
    """Yields a list of ``(call_index, layer, "attn"|"attn2", hidden, encoder_hidden)`` per attention call."""
    calls = []
    counter = {"call": -1}
    hooks = [transformer.register_forward_pre_hook(lambda m, a: counter.__setitem__("call", counter["call"] + 1))]
    for i, block in enumerate(transformer.transformer_blocks):
        for name in ("attn", "attn2"):
            mod = getattr(block, name, None)
            if mod is None:
                continue

            def hook(m, args, kwargs, i=i, name=name):
                hs = kwargs.get("hidden_states", args[0] if args else None)
                ehs = kwargs.get("encoder_hidden_states")
                calls.append((counter["call"], i, name, hs.detach().clone(), None if ehs is None else ehs.detach().clone()))

            hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def projections(attn, hidden, encoder_hidden=None):
    """``q, k`` ``[B, H, N, D]`` as the processor forms them (module dtype), image first then text."""
    B = hidden.shape[0]
    H = attn.heads

    def split(x):
        return x.view(B, -1, H, x.shape[-1] // H).transpose(1, 2)

    q, k = split(attn.to_q(hidden)), split(attn.to_k(hidden))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden is not None:
        eq, ek = split(attn.add_q_proj(encoder_hidden)), split(attn.add_k_proj(encoder_hidden))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k = torch.cat([q, eq], 2), torch.cat([k, ek], 2)
    return q, k


def reference_probs(attn, hidden, encoder_hidden=None) -> torch.Tensor:
    """Full attention matrix ``[B, H, N, N]`` in float64."""
    with torch.no_grad():
        q, k = projections(attn, hidden, encoder_hidden)
        q, k = q.double(), k.double()
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        return torch.softmax(logits, dim=-1)

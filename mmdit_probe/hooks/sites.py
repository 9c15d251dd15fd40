"""Sites and attention calls (defined with the families) and model resolution, re-exported for the hooks."""

from ..families import AttentionCall, Site, model_blocks, model_sites, resolve_transformer

ATTENTIONS = ("attn", "attn2")

__all__ = ["ATTENTIONS", "AttentionCall", "Site", "model_blocks", "model_sites", "resolve_transformer"]

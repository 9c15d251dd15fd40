"""Processors, the per-model controller, and the public ``Edit`` base class."""

from .controller import Handle, ProbeController
from .edit import Edit, Observer
from .pag import PagObserver
from ..families.hooked import HookedProcessor
from ..families.sd3_processor import ProbeProcessor
from .session import ProbeSession
from .sites import ATTENTIONS, AttentionCall, Site, model_blocks, model_sites, resolve_transformer

__all__ = ["ATTENTIONS", "AttentionCall", "Edit", "Handle", "Observer", "HookedProcessor", "PagObserver", "ProbeController",
           "ProbeProcessor", "ProbeSession", "Site", "model_blocks", "model_sites", "resolve_transformer"]

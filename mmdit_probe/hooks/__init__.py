"""Processors, the per-model controller, and the public ``Edit`` base class."""

from .controller import Handle, ProbeController
from .edit import Edit, Observer
from .pag import PagObserver
from .processor import ProbeProcessor
from .session import ProbeSession
from .sites import ATTENTIONS, AttentionCall, Site, model_sites, resolve_transformer

__all__ = ["ATTENTIONS", "AttentionCall", "Edit", "Handle", "Observer", "PagObserver", "ProbeController",
           "ProbeProcessor", "Site", "model_sites", "resolve_transformer"]

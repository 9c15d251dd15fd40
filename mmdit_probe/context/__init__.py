"""Call context: which run, step, branch, prompt and token layout each transformer call and row is."""

from .builder import ContextBuilder, call_argument
from .call import BRANCHES, CALL_KINDS, CallContext, CallContextError
from .capture import PromptCapture

__all__ = ["BRANCHES", "CALL_KINDS", "CallContext", "CallContextError", "ContextBuilder", "PromptCapture", "call_argument"]

"""Call context: which run, step, branch, prompt and token layout each transformer call and row is."""

from .call import BRANCHES, CALL_KINDS, CallContext, CallContextError

__all__ = ["BRANCHES", "CALL_KINDS", "CallContext", "CallContextError"]

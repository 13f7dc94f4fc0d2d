"""Thin kopf adapters: each handler passes a watch event or a deletion to a controller.

Importing this package registers every handler with kopf's default registry. Nothing here
decides anything; the controllers in ``dmr_operator.controllers`` do.
"""

from dmr_operator.handlers import agent, dmrmodel, runners

__all__ = ["agent", "dmrmodel", "runners"]

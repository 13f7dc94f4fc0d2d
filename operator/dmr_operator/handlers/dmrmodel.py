"""kopf handlers for DMRModel objects: watch events in, finalizer-guarded cleanup on delete."""

from __future__ import annotations

from typing import Any

import kopf

from dmr_operator import constants


@kopf.on.event(constants.GROUP, constants.VERSION, constants.DMRMODEL_PLURAL)
async def dmrmodel_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every add/modify/delete of a DMRModel updates the controller's picture (no API calls)."""
    body = event["object"]
    if event["type"] == "DELETED":
        metadata = body.get("metadata") or {}
        memo.dmrmodels.model_gone(metadata.get("namespace"), metadata.get("name"))
    else:
        memo.dmrmodels.model_changed(body)


@kopf.on.delete(constants.GROUP, constants.VERSION, constants.DMRMODEL_PLURAL)
async def dmrmodel_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Unload (or delete) the model from its runners, bounded in time, then let it go."""
    await memo.dmrmodels.finalize(dict(body))

"""The floor for apply -> configured latency: a minimal kopf operator doing only the HTTP call.

Run by ``bench/run.py`` as ``kopf run bench/floor_operator.py --standalone --namespace NS`` with
``FLOOR_RUNNER_URL`` naming one model-runner: on every new DMRModel it POSTs the same
``_configure`` body dmr-operator would send (rendered by the same pure function) and nothing
else: no pull check, no read-back, no status. The distance between this and dmr-operator is what
the operator's own machinery costs.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import kopf

from dmr_operator import constants
from dmr_operator.reconcile import dmrmodel

BACKEND = "llama.cpp"


def configure_body(body: dict[str, Any]) -> dict[str, Any]:
    """The ``_configure`` body for a DMRModel object, exactly as dmr-operator renders it."""
    return dmrmodel.configure_request(dmrmodel.target_from_object(body), BACKEND)


@kopf.on.startup()
async def start(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False  # no Events: the floor is the watch and the call only
    memo.http = httpx.AsyncClient(base_url=os.environ["FLOOR_RUNNER_URL"], timeout=30)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    await memo.http.aclose()


@kopf.on.create(constants.GROUP, constants.VERSION, "dmrmodels")
async def configure(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    response = await memo.http.post(
        f"/engines/{BACKEND}/_configure", json=configure_body(dict(body))
    )
    response.raise_for_status()

"""Which Kubernetes versions the operator runs on, judged from the apiserver's ``/version``. Pure.

The floor is 1.30 (README "Kubernetes versions"): what the operator and its children rely on
(StatefulSet PVC retention, Pod Security admission, native sidecars, CRD validation rules) is
served there; older apiservers ignore or refuse some of it, so the operator refuses to start
instead of half-working.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

MINIMUM: Final = (1, 30)
_VERSION: Final = re.compile(r"^v?(\d+)\.(\d+)")
_NUMBER: Final = re.compile(r"^(\d+)")


def server_version(info: Mapping[str, Any]) -> tuple[int, int] | None:
    """(major, minor) from ``/version``; managed clusters write minor as ``29+``."""
    major, minor = (
        _NUMBER.match(str(info.get("major", ""))),
        _NUMBER.match(str(info.get("minor", ""))),
    )
    if major and minor:
        return int(major.group(1)), int(minor.group(1))
    matched = _VERSION.match(str(info.get("gitVersion", "")))
    return (int(matched.group(1)), int(matched.group(2))) if matched else None


def version_problem(info: Mapping[str, Any]) -> str | None:
    """Why the operator must not run against this apiserver, or None."""
    found = server_version(info)
    floor = f"{MINIMUM[0]}.{MINIMUM[1]}"
    if found is None:
        return f"cannot tell the Kubernetes version from /version: {dict(info)!r}"
    if found < MINIMUM:
        return (
            f"Kubernetes {found[0]}.{found[1]} ({info.get('gitVersion', '?')}) is older than "
            f"{floor}, the oldest this operator supports (fields it writes would be ignored or "
            f"refused). Upgrade the cluster, or run a release of the operator made for it"
        )
    return None

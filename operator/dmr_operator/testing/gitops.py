"""How GitOps tools judge the operator's objects, with their own code: Flux's kstatus and the
Argo CD health check the chart ships.

Role: kstatus (``sigs.k8s.io/cli-utils/pkg/kstatus``, a Go module) is built into a tiny program
of ours (``gobuild/kstatus``) that reads an object as JSON and prints Flux's verdict; the Argo
CD check is the chart's ``argocd/health.lua``, run by a Lua 5.1 interpreter (``lupa``; Argo CD
runs gopher-lua, also 5.1) with the object as the global ``obj``, as Argo CD does. Neighbours:
``gobuild`` builds; tests/integration/test_gitops_health.py drives objects through their lives.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmr_operator.testing import gobuild

KSTATUS_BUILD = gobuild.GoBuild(
    name="kstatus-cli-utils-v0.37.2",
    module="kstatus",
    programs=("kstatus",),
    minimum_go=(1, 22),
    about="(about a minute the first time)",
)
ARGO_HEALTH_SCRIPT = Path(__file__).parents[3] / "charts" / "dmr-operator" / "argocd" / "health.lua"


def ensure_kstatus(*, progress: gobuild.Progress = gobuild.print_progress) -> Path:
    return gobuild.ensure_built(KSTATUS_BUILD, progress=progress)["kstatus"]


def kstatus(binary: Path, obj: Mapping[str, Any]) -> str:
    """Flux's verdict: InProgress, Current, Failed, Terminating, ..."""
    completed = subprocess.run(
        [str(binary)],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"kstatus failed: {completed.stderr.strip()}")
    verdict: str = json.loads(completed.stdout)["status"]
    return verdict


def argo_health(obj: Mapping[str, Any], script: Path = ARGO_HEALTH_SCRIPT) -> dict[str, str]:
    """The chart's Argo CD health check on ``obj``: {"status": Healthy|Progressing|..., ...}."""
    import lupa.lua51 as lua  # type: ignore[import-untyped]  # test-only, no stubs

    runtime = lua.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _lua_value(runtime, obj)
    result = runtime.execute(script.read_text())
    return {str(k): str(v) for k, v in result.items()}


def _lua_value(runtime: Any, value: Any) -> Any:
    """JSON as Argo CD hands it to Lua: objects and arrays as tables (arrays 1-based)."""
    if isinstance(value, Mapping):
        return runtime.table_from({k: _lua_value(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_lua_value(runtime, v) for v in value])
    return value

"""The memory estimate (reconcile.model_memory) against what the real llama-server allocates.

The real model-runner pulls the real Gemma 3 270M from the loopback registry; the estimate is
computed from its own ``GET /models/{ref}`` (read through the operator's client) for two context
sizes, each then loaded by a chat completion. llama-server reports its allocations in its log,
which model-runner serves on ``GET /logs``: the KV cache (``llama_kv_cache: size = N MiB``, one
line per cache; Gemma has a full and a sliding-window one) and, when the runner is unloaded,
the memory breakdown per device (``self = model + context + compute``). Those lines are
info-level library logs that llama-server prints only with ``--verbose``, an allowed runtime
flag. The estimate must be at least the real figure (it is used to refuse placements) and not
absurdly more; ``FIGURE`` lines print both.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx

from dmr_operator.clients import modelrunner
from dmr_operator.dmr import wire
from dmr_operator.reconcile import model_memory
from dmr_operator.testing import realpeers

MIB = 2**20
CONTEXT_SIZES = (2048, 8192)
# Not absurd: within this factor of what llama-server really takes.
AT_MOST = 8
LOG_TIMEOUT_SECONDS = 30.0
COMPLETION_TIMEOUT = httpx.Timeout(120, connect=5)

# One llama-server's output starts here; within it, the fitting pass (no allocation) constructs
# a context first, the real load last.
_SERVER_START = "llama_server: initializing"
_CONTEXT_START = "llama_context: constructing llama_context"
_KV_CACHE = re.compile(r"llama_kv_cache: size =\s*([0-9.]+) MiB \(\s*([0-9]+) cells")
_COMPUTE = re.compile(r"compute buffer size =\s*([0-9.]+) MiB")
_BREAKDOWN_HEADER = "memory breakdown [MiB]"
# "|   - Host               |                  293 =   235 +      36 +      22                |"
_BREAKDOWN_ROW = re.compile(
    r"memory_breakdown_print: \|\s+- (\S+)\s+\|\s+([0-9]+) =\s+([0-9]+) \+\s+([0-9]+) \+\s+([0-9]+)"
)


async def test_the_estimate_bounds_what_llama_server_allocates(
    real_peers: realpeers.RealPeers, tmp_path: Path
) -> None:
    # A runner pod's model-runner, on its unix socket.
    with realpeers.RunnerPodProcess(real_peers, tmp_path / "runner").runner as runner:
        await measure(runner)


async def measure(runner: realpeers.ModelRunnerProcess) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(runner.socket_path))
    async with httpx.AsyncClient(transport=transport) as http:
        client = modelrunner.ModelRunnerClient(http, runner.url)
        await client.pull(realpeers.GEMMA)
        stored = await client.get_model(realpeers.GEMMA)
        assert stored is not None
        gguf = stored.config.gguf or {}
        print("FIGURE gguf keys", " ".join(sorted(key for key in gguf if "tokenizer" not in key)))
        for context_size in CONTEXT_SIZES:
            needs = model_memory.needs_of(stored, context_size=context_size)
            assert needs is not None and not needs.estimated, "the runner exposes no GGUF shape"
            print(f"FIGURE formula ctx={context_size}: {needs.formula}")
            await client.configure(
                "llama.cpp",
                wire.ConfigureRequest(
                    model=realpeers.GEMMA, context_size=context_size, runtime_flags=["--verbose"]
                ),
            )
            await complete(http, runner.url)
            # Unloading stops llama-server, which prints its memory breakdown as it exits.
            assert await client.unload(backend="llama.cpp", models=[realpeers.GEMMA]) == 1
            real = await real_allocation(client)

            assert real.cells == context_size  # llama-server ran with the configured context
            print(
                f"FIGURE kv ctx={context_size} estimate={needs.kv_cache_bytes / MIB:.2f} MiB "
                f"llama-server={real.kv_mib:.2f} MiB "
                f"ratio={needs.kv_cache_bytes / MIB / real.kv_mib:.2f}"
            )
            print(
                f"FIGURE total ctx={context_size} estimate={needs.total_bytes / MIB:.2f} MiB "
                f"(weights {needs.weights_bytes / MIB:.2f} + kv {needs.kv_cache_bytes / MIB:.2f}"
                f" + compute {needs.compute_bytes / MIB:.2f}) llama-server={real.total_mib} MiB "
                f"({real.breakdown}; compute buffer {real.compute_mib:.2f} MiB)"
            )
            assert real.kv_mib * MIB <= needs.kv_cache_bytes <= AT_MOST * real.kv_mib * MIB
            assert real.total_mib * MIB <= needs.total_bytes <= AT_MOST * real.total_mib * MIB


async def complete(http: httpx.AsyncClient, base_url: str) -> None:
    """One short chat completion: it loads the model with the configuration just stored."""
    answer = await http.post(
        f"{base_url}/engines/v1/chat/completions",
        json={
            "model": realpeers.GEMMA,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4,
        },
        timeout=COMPLETION_TIMEOUT,
    )
    assert answer.status_code == 200, answer.text


class Allocation:
    """What the last llama-server said it allocated (MiB, as it prints them)."""

    def __init__(self, log: str) -> None:
        server = log[log.rindex(_SERVER_START) :]
        loaded = server[server.rindex(_CONTEXT_START) :]  # after the fitting pass
        caches = [(float(size), int(cells)) for size, cells in _KV_CACHE.findall(loaded)]
        assert caches, f"no KV cache size in llama-server's log:\n{loaded[-2000:]}"
        self.kv_mib = sum(size for size, _ in caches)
        self.cells = max(cells for _, cells in caches)  # the full-attention cache has n_ctx
        self.compute_mib = sum(float(size) for size in _COMPUTE.findall(loaded))
        rows = _BREAKDOWN_ROW.findall(loaded[loaded.rindex(_BREAKDOWN_HEADER) :])
        assert rows, f"no memory breakdown in llama-server's log:\n{loaded[-2000:]}"
        self.total_mib = sum(int(row[1]) for row in rows)
        self.breakdown = ", ".join(
            f"{device} {own} = model {weights} + context {context} + compute {compute}"
            for device, own, weights, context, compute in rows
        )


async def real_allocation(client: modelrunner.ModelRunnerClient) -> Allocation:
    """llama-server's allocations from ``GET /logs``, once its exit report is there."""
    deadline = time.monotonic() + LOG_TIMEOUT_SECONDS
    while True:
        log = "\n".join(await client.log_tail(lines=1_000_000))
        server = log[log.rfind(_SERVER_START) :]
        if _BREAKDOWN_HEADER in server[server.rfind(_CONTEXT_START) :]:
            return Allocation(log)
        assert time.monotonic() < deadline, f"no exit report from llama-server:\n{log[-2000:]}"
        await asyncio.sleep(0.5)

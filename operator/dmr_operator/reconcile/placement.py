"""Which pods of its runner pool each DMRModel should be on: the pool as a shared model cache.

Pure and deterministic. model-runner loads whatever it is asked to, up to its runner slots and
with no memory admission (real-peers.md M6), so the operator decides: each model goes on
``replicas`` pods of its pool (``ALL``: every pod where it fits) whose memory budget (GPU memory,
or host memory on a CPU pod) and runner slots still have room for its ``ModelNeeds``
(``reconcile.model_memory``). The controller turns the result into pulls, unloads and Service
endpoints, making the new pod ready before it lets an old one go; this module only computes
the target.

Rules, in the order they apply:
1. No pod is ever given more than its memory budget or its runner slots. What a model takes
   can depend on the pod: a vLLM model reserves its share of the pod's GPU memory
   (``ModelNeeds.on_pod``). A copy a pod holds now (``RunnerPod.holdings``) is counted until
   it is gone, wherever the model is placed: a model moving away still takes its memory and
   slot on the old pod until it is unloaded there, and so do copies placement does not decide
   (models on every pod of the pool, models whose new needs are still being read). A model
   placed again on a pod that holds it takes its new size instead of its old one.
2. Stability first: a model stays where the previous placement put it (still in its pool, still
   fitting), then where pods report holding it, before anything new is placed; so a new pod or
   a deleted model never moves a model that still fits.
3. New replicas go to nodes the model is not on yet (a node failure takes out as few replicas
   as possible), then to the pod whose free memory per free runner slot is closest to what the
   model needs (so neither memory nor slots are left stranded), then by pod key.
4. Models are taken already-placed first, then larger first (the hard ones while there is
   room), then by key; nothing depends on the order of the inputs.
A model short of its replicas gets a ``Shortfall``: what it needs and the most memory any other
pod of its pool has left, for a message a person can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias, TypeVar

from dmr_operator.reconcile import model_memory

ALL: Final = "All"
Replicas: TypeAlias = int | Literal["All"]


@dataclass(frozen=True)
class ModelDemand:
    """One DMRModel as placement sees it."""

    key: str  # namespace/name
    pool: str
    replicas: Replicas
    needs: model_memory.ModelNeeds


@dataclass(frozen=True)
class RunnerPod:
    """One model-runner pod: where it runs, what it can hold, what it holds now."""

    key: str  # namespace/name
    pools: frozenset[str]  # the pools whose selectors match it (selectors may overlap)
    node: str
    slots: int  # model-runner's runner slots, min(cores, 8) (reconcile.capacity)
    gpu_memory_bytes: int  # 0: a CPU pod, whose models live in host memory
    host_memory_bytes: int
    # Model key -> the bytes its copy on this pod takes now (serving, or leaving and not yet
    # unloaded). Each takes a runner slot too.
    holdings: Mapping[str, int] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        """The budget models are placed against: llama.cpp offloads every layer to the GPUs
        when there are some (``-ngl 999``), else it all stays in host memory."""
        return self.gpu_memory_bytes if self.gpu_memory_bytes > 0 else self.host_memory_bytes


@dataclass(frozen=True)
class Shortfall:
    """Why a model is on fewer pods than it wants, in numbers."""

    wanted: int
    placed: int
    pool_pods: int
    needed_bytes: int
    # The most memory left on a pod of the pool that does not hold the model (None: no such pod).
    largest_free_bytes: int | None
    largest_free_pod: str | None
    # Pods of the pool with the memory to spare but every runner slot taken.
    slots_full: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    pods: Mapping[str, tuple[str, ...]]  # model key -> the pods it should be on, sorted
    shortfalls: Mapping[str, Shortfall]  # only models short of their replicas
    # Pod key -> the memory and runner slots left once this placement is carried out (while
    # the copies each pod holds and is not given again are still there): what a pool has
    # room for, as metrics show it.
    free_memory_bytes: Mapping[str, int] = field(default_factory=dict)
    free_slots: Mapping[str, int] = field(default_factory=dict)


def place(
    models: Iterable[ModelDemand],
    pods: Iterable[RunnerPod],
    *,
    previous: Mapping[str, Collection[str]] | None = None,
) -> Placement:
    """The target placement of ``models`` on ``pods``, given the ``previous`` one (model key
    -> pod keys). Pods and models missing from the inputs are simply gone: their models are
    placed anew and their entries in ``previous`` ignored."""
    demands = _unique(models, "model")
    for model in demands.values():
        if model.replicas != ALL and int(model.replicas) < 0:
            raise ValueError(f"model {model.key!r} wants {model.replicas} replicas")
    state = _State(demands, _unique(pods, "pod"))
    before = previous or {}
    order = sorted(
        state.models.values(),
        key=lambda model: (
            not (state.held_by(model) or state.previous_of(model, before)),
            -model.needs.total_bytes,
            model.key,
        ),
    )
    for model in order:  # 2. where the previous placement put it ...
        for pod in state.ranked(model, state.previous_of(model, before)):
            state.assign_if_fits(model, pod)
    for model in order:  # ... then where it already is
        for pod in state.ranked(model, state.held_by(model)):
            state.assign_if_fits(model, pod)
    for model in order:  # 3. then new replicas, one at a time
        while state.wants_more(model):
            candidates = [pod for pod in state.pool(model) if state.fits(model, pod)]
            if not candidates:
                break
            state.assign_if_fits(model, min(candidates, key=state.preference(model)))
    return Placement(
        pods={key: tuple(sorted(state.placed[key])) for key in sorted(state.models)},
        shortfalls={
            model.key: state.shortfall(model)
            for model in order
            if len(state.placed[model.key]) < state.wanted(model)
        },
        free_memory_bytes=dict(sorted(state.free_memory.items())),
        free_slots=dict(sorted(state.free_slots.items())),
    )


def shortfall_message(shortfall: Shortfall) -> str:
    """``placed on 1 of 3 pods: needs 9.3 GiB, largest free 7.8 GiB on pod ns/runner-2``."""
    text = f"placed on {shortfall.placed} of {shortfall.wanted} pods: needs "
    text += f"{_size(shortfall.needed_bytes)}"
    if shortfall.largest_free_pod is None or shortfall.largest_free_bytes is None:
        text += f", and the pool has no other pod (it has {shortfall.pool_pods})"
    else:
        text += (
            f", largest free {_size(shortfall.largest_free_bytes)} "
            f"on pod {shortfall.largest_free_pod}"
        )
    if shortfall.slots_full:
        text += f"; with the memory but no free runner slot: {', '.join(shortfall.slots_full)}"
    return text


_Preference: TypeAlias = Callable[[RunnerPod], tuple[bool, float, str]]


class _State:
    """Free memory and slots per pod while models are assigned, and the rules' questions."""

    def __init__(self, models: Mapping[str, ModelDemand], pods: Mapping[str, RunnerPod]) -> None:
        self.models = models
        self.pods = pods
        self.free_memory = {
            key: pod.memory_bytes - sum(pod.holdings.values()) for key, pod in pods.items()
        }
        self.free_slots = {key: pod.slots - len(pod.holdings) for key, pod in pods.items()}
        self.placed: dict[str, list[str]] = {key: [] for key in models}
        self._pools: dict[str, list[RunnerPod]] = {}
        for key in sorted(pods):
            for pool in pods[key].pools:
                self._pools.setdefault(pool, []).append(pods[key])

    def pool(self, model: ModelDemand) -> list[RunnerPod]:
        return self._pools.get(model.pool, [])

    def wanted(self, model: ModelDemand) -> int:
        return len(self.pool(model)) if model.replicas == ALL else int(model.replicas)

    def wants_more(self, model: ModelDemand) -> bool:
        return len(self.placed[model.key]) < self.wanted(model)

    @staticmethod
    def need(model: ModelDemand, pod: RunnerPod) -> int:
        return model.needs.on_pod(pod.gpu_memory_bytes)

    def fits(self, model: ModelDemand, pod: RunnerPod) -> bool:
        if pod.key in self.placed[model.key]:
            return False
        need = self.need(model, pod)
        held = pod.holdings.get(model.key)
        if held is not None:
            # Its copy is there, with its slot: keeping it adds nothing, growing it must fit.
            return need <= held or self.free_memory[pod.key] + held >= need
        return self.free_slots[pod.key] > 0 and self.free_memory[pod.key] >= need

    def assign_if_fits(self, model: ModelDemand, pod: RunnerPod) -> None:
        if self.wants_more(model) and self.fits(model, pod):
            held = pod.holdings.get(model.key)
            self.placed[model.key].append(pod.key)
            # The copy there is replaced by the new one: the larger of the two counts, since
            # the old one takes its memory until the runner reloads it.
            self.free_memory[pod.key] -= max(0, self.need(model, pod) - (held or 0))
            if held is None:
                self.free_slots[pod.key] -= 1

    def held_by(self, model: ModelDemand) -> list[RunnerPod]:
        return [pod for pod in self.pool(model) if model.key in pod.holdings]

    def previous_of(
        self, model: ModelDemand, previous: Mapping[str, Collection[str]]
    ) -> list[RunnerPod]:
        keys = set(previous.get(model.key, ()))
        return [pod for pod in self.pool(model) if pod.key in keys]

    def ranked(self, model: ModelDemand, pods: list[RunnerPod]) -> list[RunnerPod]:
        """Incumbent pods in the order they are kept when there are more than wanted: those
        that hold the model already, then one per node, then by key."""
        ranked: list[RunnerPod] = []
        nodes: set[str] = set()
        remaining = sorted(pods, key=lambda pod: (model.key not in pod.holdings, pod.key))
        while remaining:
            pod = min(remaining, key=lambda pod: pod.node in nodes)  # min is stable: first wins
            remaining.remove(pod)
            ranked.append(pod)
            nodes.add(pod.node)
        return ranked

    def preference(self, model: ModelDemand) -> _Preference:
        nodes = {self.pods[key].node for key in self.placed[model.key]}

        # Memory and runner slots run out together: the pod whose free memory per free slot is
        # closest to what the model needs. Small models go where slots are cheap in memory,
        # big ones where they are dear, and neither wastes the other's (60 mixed models on 8
        # pods: most free memory left 12 out, tightest memory fit 8, this fewer; BENCHMARKS.md).
        def key(pod: RunnerPod) -> tuple[bool, float, str]:
            per_slot = self.free_memory[pod.key] / max(1, self.free_slots[pod.key])
            return (pod.node in nodes, abs(per_slot - self.need(model, pod)), pod.key)

        return key

    def shortfall(self, model: ModelDemand) -> Shortfall:
        others = [pod for pod in self.pool(model) if pod.key not in self.placed[model.key]]
        largest = min(others, key=lambda pod: (-self.free_memory[pod.key], pod.key), default=None)
        return Shortfall(
            wanted=self.wanted(model),
            placed=len(self.placed[model.key]),
            pool_pods=len(self.pool(model)),
            # On the pod it is compared with: a vLLM model's need is its share of that GPU.
            needed_bytes=model.needs.total_bytes if largest is None else self.need(model, largest),
            largest_free_bytes=None if largest is None else self.free_memory[largest.key],
            largest_free_pod=None if largest is None else largest.key,
            slots_full=tuple(
                pod.key
                for pod in others
                if self.free_slots[pod.key] <= 0
                and self.free_memory[pod.key] >= self.need(model, pod)
            ),
        )


_Keyed = TypeVar("_Keyed", ModelDemand, RunnerPod)


def _unique(items: Iterable[_Keyed], what: str) -> dict[str, _Keyed]:
    by_key: dict[str, _Keyed] = {}
    for item in items:
        if item.key in by_key:
            raise ValueError(f"two {what}s have the key {item.key!r}")
        by_key[item.key] = item
    return by_key


def _size(size: int) -> str:
    if abs(size) >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.1f} MiB"

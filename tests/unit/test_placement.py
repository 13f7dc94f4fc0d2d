"""Placement of models on the pods of their pools (reconcile.placement).

Examples for each rule (memory and slots never overcommitted, stability, spread over nodes,
``ALL``, CPU pods on host memory, shortfalls and their message), then properties over random
pools: no overcommit, independence of input order, idempotence, minimal moves when a pod is
added or a model deleted, spread when nodes allow it, and a shortfall exactly when a model is
short and nothing more fits it."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from random import Random
from typing import NamedTuple, TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmr_operator.api.v1alpha1.dmrmodel import DMRModelSpec
from dmr_operator.reconcile import model_memory, placement

GIB = 2**30


def needs(size: int) -> model_memory.ModelNeeds:
    return model_memory.ModelNeeds(
        weights_bytes=size,
        kv_cache_bytes=0,
        compute_bytes=0,
        context_size=None,
        estimated=False,
        formula="",
    )


def model(
    key: str, size: int, replicas: placement.Replicas = 1, pool: str = "default"
) -> placement.ModelDemand:
    return placement.ModelDemand(key=key, pool=pool, replicas=replicas, needs=needs(size))


def pod(
    key: str,
    node: str,
    gpu: int = 0,
    *,
    host: int = 0,
    slots: int = 8,
    pool: str | Collection[str] = "default",
    holds: Mapping[str, int] | Sequence[str] = (),
) -> placement.RunnerPod:
    """A pod; ``holds`` a mapping of model key to the bytes its copy takes, or model keys
    (copies counted at 0 bytes: only their runner slot)."""
    return placement.RunnerPod(
        key=key,
        pools=frozenset([pool] if isinstance(pool, str) else pool),
        node=node,
        slots=slots,
        gpu_memory_bytes=gpu,
        host_memory_bytes=host,
        holdings=dict(holds) if isinstance(holds, Mapping) else dict.fromkeys(holds, 0),
    )


# --- examples ---------------------------------------------------------------------------------


def test_replicas_spread_over_nodes_before_doubling_up() -> None:
    pods = [pod("ns/a1", "a", 80 * GIB), pod("ns/a2", "a", 80 * GIB), pod("ns/b1", "b", 40 * GIB)]
    result = placement.place([model("ns/m", 10 * GIB, replicas=2)], pods)
    # One replica per node first (b1 is the tighter fit, then a1 by key), never a1 and a2.
    assert result.pods == {"ns/m": ("ns/a1", "ns/b1")}
    assert result.shortfalls == {}
    three = placement.place([model("ns/m", 10 * GIB, replicas=3)], pods)
    assert three.pods == {"ns/m": ("ns/a1", "ns/a2", "ns/b1")}


def test_memory_is_never_overcommitted_and_larger_models_go_first() -> None:
    pods = [pod("ns/p", "n", 24 * GIB)]
    models = [model("ns/small", 6 * GIB), model("ns/big", 20 * GIB), model("ns/mid", 10 * GIB)]
    result = placement.place(models, pods)
    assert result.pods == {"ns/big": ("ns/p",), "ns/mid": (), "ns/small": ()}
    assert set(result.shortfalls) == {"ns/mid", "ns/small"}
    assert placement.shortfall_message(result.shortfalls["ns/mid"]) == (
        "placed on 0 of 1 pods: needs 10.0 GiB, largest free 4.0 GiB on pod ns/p"
    )


def test_runner_slots_are_never_overcommitted() -> None:
    pods = [pod("ns/p", "n", 80 * GIB, slots=2)]
    models = [model(f"ns/m{i}", GIB) for i in range(3)]
    result = placement.place(models, pods)
    assert sum(1 for pods_of in result.pods.values() if pods_of) == 2
    (short,) = result.shortfalls.values()
    assert short.slots_full == ("ns/p",)
    assert placement.shortfall_message(short) == (
        "placed on 0 of 1 pods: needs 1.0 GiB, largest free 78.0 GiB on pod ns/p; "
        "with the memory but no free runner slot: ns/p"
    )


def test_a_cpu_pod_is_placed_against_its_host_memory() -> None:
    pods = [pod("ns/cpu", "n", 0, host=2 * GIB), pod("ns/gpu", "g", GIB, host=64 * GIB)]
    result = placement.place([model("ns/m", int(1.5 * GIB), replicas=placement.ALL)], pods)
    assert result.pods == {"ns/m": ("ns/cpu",)}
    assert placement.shortfall_message(result.shortfalls["ns/m"]) == (
        "placed on 1 of 2 pods: needs 1.5 GiB, largest free 1.0 GiB on pod ns/gpu"
    )


def test_a_vllm_model_takes_its_share_of_the_gpu_whatever_its_size() -> None:
    # vLLM reserves gpu-memory-utilization x the GPU at start-up: a second vLLM model cannot
    # share an 80 GiB GPU with one at 0.9, but a 4 GiB llama.cpp model fits the 8 GiB left.
    vllm = dataclasses.replace(needs(10 * GIB), gpu_share=0.9)
    models = [
        placement.ModelDemand(key="ns/a", pool="default", replicas=1, needs=vllm),
        placement.ModelDemand(key="ns/b", pool="default", replicas=1, needs=vllm),
        model("ns/small", 4 * GIB),
    ]
    result = placement.place(models, [pod("ns/p0", "n0", gpu=80 * GIB)])
    assert result.pods == {"ns/a": ("ns/p0",), "ns/b": (), "ns/small": ("ns/p0",)}
    assert result.shortfalls["ns/b"].largest_free_bytes == 80 * GIB - 72 * GIB - 4 * GIB
    assert "needs 72.0 GiB, largest free 4.0 GiB" in placement.shortfall_message(
        result.shortfalls["ns/b"]
    )
    # On a CPU pod there is no GPU to reserve a share of: the model's own size counts.
    assert vllm.on_pod(0) == 10 * GIB
    assert vllm.on_pod(80 * GIB) == 72 * GIB


def test_vllm_share_comes_from_the_spec() -> None:
    def share(**spec: object) -> float | None:
        return model_memory.vllm_gpu_share(DMRModelSpec.model_validate({"model": "ai/m", **spec}))

    assert share() is None
    assert share(backend="llama.cpp") is None
    assert share(backend="vllm") == model_memory.VLLM_DEFAULT_GPU_SHARE
    assert share(vllm={"gpuMemoryUtilization": 0.5}) == 0.5
    assert share(backend="llama.cpp", vllm={"gpuMemoryUtilization": 0.5}) is None


def test_all_means_every_pod_of_its_pool_where_it_fits() -> None:
    pods = [pod(f"ns/p{i}", f"n{i}", 16 * GIB) for i in range(3)]
    pods.append(pod("ns/other", "n0", 80 * GIB, pool="other"))
    result = placement.place([model("ns/m", 9 * GIB, replicas=placement.ALL)], pods)
    assert result.pods == {"ns/m": ("ns/p0", "ns/p1", "ns/p2")}
    assert result.shortfalls == {}


def test_the_previous_placement_is_kept_while_it_fits() -> None:
    pods = [pod("ns/old", "a", 24 * GIB), pod("ns/new", "b", 80 * GIB)]
    result = placement.place(
        [model("ns/m", 10 * GIB)], pods, previous={"ns/m": ["ns/old", "ns/gone"]}
    )
    assert result.pods == {"ns/m": ("ns/old",)}  # not the emptier new pod
    # Without a previous placement, what the pods hold keeps it there too.
    held = [pod("ns/old", "a", 24 * GIB, holds=["ns/m"]), pod("ns/new", "b", 80 * GIB)]
    assert placement.place([model("ns/m", 10 * GIB)], held).pods == {"ns/m": ("ns/old",)}


def test_a_new_replica_goes_where_free_memory_per_slot_matches_its_needs() -> None:
    pods = [pod("ns/p1", "a", 24 * GIB), pod("ns/p2", "b", 16 * GIB), pod("ns/p3", "c", 16 * GIB)]
    result = placement.place([model("ns/m", GIB)], pods)
    assert result.pods == {"ns/m": ("ns/p2",)}  # p2 and p3 tie: the pod key decides
    # The big pod stays free for the model only it can hold, even when it arrives later.
    later = placement.place(
        [model("ns/m", GIB), model("ns/big", 20 * GIB)], pods, previous=result.pods
    )
    assert later.pods == {"ns/big": ("ns/p1",), "ns/m": ("ns/p2",)}


def test_a_previous_placement_outside_the_pool_is_ignored() -> None:
    pods = [pod("ns/a", "n", 8 * GIB, pool="other"), pod("ns/b", "n", 8 * GIB)]
    result = placement.place([model("ns/m", GIB)], pods, previous={"ns/m": ["ns/a"]})
    assert result.pods == {"ns/m": ("ns/b",)}


def test_a_pod_that_is_gone_has_its_models_placed_elsewhere() -> None:
    before = {"ns/m": ["ns/gone"]}
    result = placement.place([model("ns/m", GIB)], [pod("ns/p", "n", 8 * GIB)], previous=before)
    assert result.pods == {"ns/m": ("ns/p",)}


def test_fewer_replicas_keep_the_pods_that_hold_the_model_then_one_per_node() -> None:
    pods = [
        pod("ns/a1", "a", 80 * GIB),
        pod("ns/a2", "a", 80 * GIB, holds=["ns/m"]),
        pod("ns/b1", "b", 80 * GIB),
    ]
    previous = {"ns/m": ["ns/a1", "ns/a2", "ns/b1"]}
    result = placement.place([model("ns/m", GIB, replicas=2)], pods, previous=previous)
    assert result.pods == {"ns/m": ("ns/a2", "ns/b1")}


def test_a_shortfall_names_a_pool_without_room_for_more() -> None:
    result = placement.place([model("ns/m", 9 * GIB, replicas=3)], [pod("ns/p", "n", 80 * GIB)])
    assert result.pods == {"ns/m": ("ns/p",)}
    assert placement.shortfall_message(result.shortfalls["ns/m"]) == (
        "placed on 1 of 3 pods: needs 9.0 GiB, and the pool has no other pod (it has 1)"
    )
    tiny = placement.place([model("ns/m", 300 * 2**20)], [pod("ns/p", "n", 100 * 2**20)])
    assert placement.shortfall_message(tiny.shortfalls["ns/m"]) == (
        "placed on 0 of 1 pods: needs 300.0 MiB, largest free 100.0 MiB on pod ns/p"
    )


def test_a_copy_leaving_a_pod_counts_there_until_it_is_unloaded() -> None:
    # m served from the 8 GiB pod with 4 GiB; its context grew and it now needs 10 GiB: it
    # moves to the big pod, and its old copy still takes 4 GiB and a slot on the small one
    # until it is unloaded there, so a 6 GiB model cannot go there meanwhile.
    pods = [
        pod("ns/small", "a", 8 * GIB, slots=2, holds={"ns/m": 4 * GIB}),
        pod("ns/big", "b", 24 * GIB),
    ]
    models = [model("ns/m", 10 * GIB), model("ns/n", 6 * GIB)]
    result = placement.place(models, pods, previous={"ns/m": ["ns/small"]})
    assert result.pods == {"ns/m": ("ns/big",), "ns/n": ("ns/big",)}
    one_slot = placement.place(
        [model("ns/n", GIB)], [pod("ns/small", "a", 8 * GIB, slots=1, holds={"ns/m": 0})]
    )
    assert one_slot.pods == {"ns/n": ()}
    assert one_slot.shortfalls["ns/n"].slots_full == ("ns/small",)


def test_a_copy_placed_again_counts_once_at_the_larger_of_its_sizes() -> None:
    held = pod("ns/p", "a", 16 * GIB, holds={"ns/m": 6 * GIB})
    grown = placement.place([model("ns/m", 10 * GIB), model("ns/n", 6 * GIB)], [held])
    assert grown.pods == {"ns/m": ("ns/p",), "ns/n": ("ns/p",)}  # 10 + 6 of 16
    # Shrunk: its old size counts until the runner reloads it, so 4 GiB is not free yet.
    shrunk = placement.place([model("ns/m", 2 * GIB), model("ns/n", 14 * GIB)], [held])
    assert shrunk.pods == {"ns/m": ("ns/p",), "ns/n": ()}
    # A pod already over its memory keeps the copies it has, and takes nothing more.
    over = pod("ns/p", "a", 4 * GIB, holds={"ns/m": 6 * GIB, "ns/everywhere": GIB})
    result = placement.place([model("ns/m", 6 * GIB), model("ns/n", GIB)], [over])
    assert result.pods == {"ns/m": ("ns/p",), "ns/n": ()}


def test_a_pod_in_two_pools_is_counted_once() -> None:
    shared = pod("ns/p", "a", 10 * GIB, pool=("gpu", "fast"))
    models = [model("ns/x", 6 * GIB, pool="gpu"), model("ns/y", 6 * GIB, pool="fast")]
    result = placement.place(models, [shared])
    assert result.pods == {"ns/x": ("ns/p",), "ns/y": ()}
    assert placement.shortfall_message(result.shortfalls["ns/y"]) == (
        "placed on 0 of 1 pods: needs 6.0 GiB, largest free 4.0 GiB on pod ns/p"
    )


def test_models_placement_does_not_decide_take_their_memory_and_slot() -> None:
    # A model on every pod of the pool (no placement) is held at its size, with its slot.
    pods = [pod("ns/p", "a", 16 * GIB, slots=2, holds={"ns/everywhere": 12 * GIB})]
    result = placement.place([model("ns/m", 6 * GIB), model("ns/n", GIB)], pods)
    assert result.pods == {"ns/m": (), "ns/n": ("ns/p",)}


def test_keys_are_unique_and_replicas_not_negative() -> None:
    with pytest.raises(ValueError, match="two pods"):
        placement.place([], [pod("ns/p", "n"), pod("ns/p", "m")])
    with pytest.raises(ValueError, match="two models"):
        placement.place([model("ns/m", 1), model("ns/m", 2)], [])
    with pytest.raises(ValueError, match="-1 replicas"):
        placement.place([model("ns/m", 1, replicas=-1)], [])


# --- properties -------------------------------------------------------------------------------

# Small numbers on purpose: equal capacities and sizes make ties, full pods make shortfalls.
POOLS = ("a", "b")
MODEL_KEYS = tuple(f"ns/m{i}" for i in range(6))
POD_KEYS = tuple(f"ns/p{i}" for i in range(7))


Pool: TypeAlias = tuple[list[placement.ModelDemand], list[placement.RunnerPod]]


@st.composite
def pools(draw: st.DrawFn) -> Pool:
    keys = draw(st.lists(st.sampled_from(MODEL_KEYS), unique=True, max_size=len(MODEL_KEYS)))
    models = [
        model(
            key,
            draw(st.integers(1, 6)) * GIB,
            replicas=draw(st.one_of(st.integers(0, 4), st.just(placement.ALL))),
            pool=draw(st.sampled_from(POOLS)),
        )
        for key in keys
    ]
    pod_keys = draw(st.lists(st.sampled_from(POD_KEYS), unique=True, max_size=len(POD_KEYS)))
    pods = [
        pod(
            key,
            draw(st.sampled_from(("n0", "n1", "n2"))),
            draw(st.sampled_from((0, 4, 8, 12))) * GIB,
            host=draw(st.sampled_from((0, 6, 16))) * GIB,
            slots=draw(st.integers(0, 3)),
            pool=draw(st.sets(st.sampled_from(POOLS), min_size=1)),
            holds=draw(
                st.dictionaries(
                    st.sampled_from(MODEL_KEYS), st.integers(0, 6).map(GIB.__mul__), max_size=3
                )
            ),
        )
        for key in pod_keys
    ]
    return models, pods


previous_placements = st.dictionaries(
    st.sampled_from(MODEL_KEYS),
    st.lists(st.sampled_from((*POD_KEYS, "ns/gone")), unique=True, max_size=4),
)


def wanted(demand: placement.ModelDemand, pods: Sequence[placement.RunnerPod]) -> int:
    in_pool = sum(1 for p in pods if demand.pool in p.pools)
    return in_pool if demand.replicas == placement.ALL else int(demand.replicas)


def free_memory(
    result: placement.Placement,
    models: Sequence[placement.ModelDemand],
    pods: Sequence[placement.RunnerPod],
) -> tuple[dict[str, int], dict[str, int]]:
    """Memory and slots left on each pod once the placement is carried out, while the copies
    pods hold and no model is placed on again are still there (leaving, or not placement's):
    a copy placed again takes the larger of its old and new size."""
    needs = {m.key: m.needs for m in models}
    memory, slots = {}, {}
    for p in pods:
        on_it = {key for key, keys in result.pods.items() if p.key in keys}
        kept = {key: held for key, held in p.holdings.items() if key not in on_it}
        used = sum(kept.values()) + sum(
            max(needs[k].on_pod(p.gpu_memory_bytes), p.holdings.get(k, 0)) for k in on_it
        )
        memory[p.key] = p.memory_bytes - used
        slots[p.key] = p.slots - len(on_it | set(p.holdings))
    return memory, slots


def holding(
    pods: Sequence[placement.RunnerPod],
    pods_of: Mapping[str, Sequence[str]],
    models: Sequence[placement.ModelDemand],
) -> list[placement.RunnerPod]:
    """The pods once the placement is carried out: the placed copies at their size, the
    copies that left unloaded, and those placement does not decide as they were."""
    needs = {m.key: m.needs.total_bytes for m in models}
    held = {
        p.key: {
            **{key: size for key, size in p.holdings.items() if key not in needs},
            **{key: needs[key] for key, keys in pods_of.items() if p.key in keys},
        }
        for p in pods
    }
    return [dataclasses.replace(p, holdings=held[p.key]) for p in pods]


class Outcome(NamedTuple):
    models: list[placement.ModelDemand]
    pods: list[placement.RunnerPod]
    result: placement.Placement
    memory: dict[str, int]  # left on each pod
    slots: dict[str, int]


def outcome(pool: Pool, previous: Mapping[str, Sequence[str]]) -> Outcome:
    models, pods = pool
    result = placement.place(models, pods, previous=previous)
    return Outcome(models, pods, result, *free_memory(result, models, pods))


@given(pools(), previous_placements)
def test_never_overcommits_and_stays_in_the_pool(
    pool: Pool, previous: dict[str, list[str]]
) -> None:
    models, pods, result, memory, slots = outcome(pool, previous)
    # What the placement says is left (metrics show it) is what carrying it out leaves.
    assert (result.free_memory_bytes, result.free_slots) == (memory, slots)
    by_key = {p.key: p for p in pods}
    for key, left in memory.items():
        # A pod already over its memory by what it holds (its budget shrank, copies placement
        # does not decide) is given nothing more; any other pod stays within its memory.
        assert left >= min(0, by_key[key].memory_bytes - sum(by_key[key].holdings.values()))
    for key, left in slots.items():
        assert left >= min(0, by_key[key].slots - len(by_key[key].holdings))
    assert set(result.pods) == {m.key for m in models}
    for demand in models:
        placed = result.pods[demand.key]
        assert list(placed) == sorted(set(placed))
        assert all(demand.pool in by_key[key].pools for key in placed)
        assert len(placed) <= wanted(demand, pods)


@given(pools(), previous_placements, st.randoms(use_true_random=False))
def test_the_order_of_the_inputs_does_not_matter(
    pool: Pool,
    previous: dict[str, list[str]],
    random: Random,
) -> None:
    models, pods = pool
    expected = placement.place(models, pods, previous=previous)
    shuffled_models, shuffled_pods = list(models), list(pods)
    random.shuffle(shuffled_models)
    random.shuffle(shuffled_pods)
    shuffled_previous = {key: list(reversed(keys)) for key, keys in reversed(previous.items())}
    assert placement.place(shuffled_models, shuffled_pods, previous=shuffled_previous) == expected


@given(pools(), previous_placements)
def test_placing_again_changes_nothing(
    pool: Pool,
    previous: dict[str, list[str]],
) -> None:
    models, pods = pool
    first = placement.place(models, pods, previous=previous)
    assert placement.place(models, pods, previous=first.pods) == first
    # And once the pods hold what they were given, with or without the previous placement
    # (an operator that restarted has only what the pods hold): every model stays, and only
    # the room the copies that left (or shrank) have freed can add replicas to models short of
    # theirs; when carrying it out changes no copy, nothing changes at all.
    held = holding(pods, first.pods, models)
    unchanged = [p.holdings for p in held] == [p.holdings for p in pods]
    for again in (
        placement.place(models, held, previous=first.pods),
        placement.place(models, held),
    ):
        assert_only_additions(first, again, models)
        if unchanged:
            assert again == first


@given(
    pools(),
    previous_placements,
    st.sampled_from(POOLS),
    st.sampled_from(("n0", "n3")),
    st.sampled_from((4, 80)),
    st.booleans(),
)
def test_a_new_pod_moves_nothing(
    pool: Pool,
    previous: dict[str, list[str]],
    new_pool: str,
    new_node: str,
    new_memory: int,
    restarted: bool,
) -> None:
    models, pods = pool
    first = placement.place(models, pods, previous=previous)
    added = pod("ns/new", new_node, new_memory * GIB, pool=new_pool)
    if restarted:  # the operator lost its previous placement: only what pods hold remains
        second = placement.place(models, [*holding(pods, first.pods, models), added])
    else:
        second = placement.place(models, [*pods, added], previous=first.pods)
    assert_only_additions(first, second, models)


@given(pools(), previous_placements, st.data())
def test_deleting_a_model_moves_no_other(
    pool: Pool,
    previous: dict[str, list[str]],
    data: st.DataObject,
) -> None:
    models, pods = pool
    if not models:
        return
    first = placement.place(models, pods, previous=previous)
    deleted = data.draw(st.sampled_from([m.key for m in models]))
    remaining = [m for m in models if m.key != deleted]
    second = placement.place(remaining, pods, previous=first.pods)
    assert_only_additions(first, second, remaining)


def assert_only_additions(
    first: placement.Placement,
    second: placement.Placement,
    models: Sequence[placement.ModelDemand],
) -> None:
    """Every model keeps its pods; one that had all its replicas gets nothing else."""
    for demand in models:
        kept = set(first.pods[demand.key])
        assert kept <= set(second.pods[demand.key]), demand.key
        if demand.replicas != placement.ALL and demand.key not in first.shortfalls:
            assert second.pods[demand.key] == first.pods[demand.key], demand.key


@given(
    st.lists(
        st.tuples(st.sampled_from(("n0", "n1", "n2", "n3")), st.integers(0, 12), st.integers(0, 2)),
        max_size=7,
    ),
    st.integers(1, 8),
    st.integers(0, 5),
)
def test_one_model_spreads_over_every_node_that_can_take_it(
    shapes: list[tuple[str, int, int]], size: int, replicas: int
) -> None:
    pods = [pod(f"ns/p{i}", node, gib * GIB, slots=s) for i, (node, gib, s) in enumerate(shapes)]
    result = placement.place([model("ns/m", size * GIB, replicas=replicas)], pods)
    fitting = [p for p in pods if p.memory_bytes >= size * GIB and p.slots > 0]
    placed = result.pods["ns/m"]
    assert len(placed) == min(replicas, len(fitting))
    nodes = {p.node for p in pods if p.key in placed}
    assert len(nodes) == min(len(placed), len({p.node for p in fitting}))


@given(pools())
def test_with_room_everywhere_every_model_spreads(
    pool: Pool,
) -> None:
    models, small = pool
    pods = [
        pod(p.key, p.node, 1000 * GIB, slots=len(MODEL_KEYS), pool=p.pools) for p in small
    ]  # and nothing held yet: what pods hold is kept even on one node (stability first)
    result = placement.place(models, pods)
    by_key = {p.key: p for p in pods}
    for demand in models:
        placed = result.pods[demand.key]
        pool_pods = [p for p in pods if demand.pool in p.pools]
        assert len(placed) == min(wanted(demand, pods), len(pool_pods))
        pool_nodes = {p.node for p in pool_pods}
        assert len({by_key[key].node for key in placed}) == min(len(placed), len(pool_nodes))


@settings(max_examples=200)
@given(pools(), previous_placements)
def test_a_shortfall_exactly_when_short_and_nothing_more_fits(
    pool: Pool, previous: dict[str, list[str]]
) -> None:
    models, pods, result, memory, slots = outcome(pool, previous)
    for demand in models:
        placed = result.pods[demand.key]
        short = len(placed) < wanted(demand, pods)
        assert (demand.key in result.shortfalls) == short, demand.key
        if not short:
            continue
        shortfall = result.shortfalls[demand.key]
        others = [p for p in pods if demand.pool in p.pools and p.key not in placed]
        need = demand.needs.total_bytes

        # Greedy but maximal: no other pod of the pool has room for one more replica (a pod
        # with a copy of this model leaving it counts that copy's room too).
        assert not [
            p
            for p in others
            if (
                (held := p.holdings.get(demand.key)) is not None
                and (need <= held or memory[p.key] + held >= need)
            )
            or (held is None and memory[p.key] >= need and slots[p.key] > 0)
        ]
        assert (shortfall.wanted, shortfall.placed) == (wanted(demand, pods), len(placed))
        assert shortfall.needed_bytes == need
        assert shortfall.largest_free_bytes == max((memory[p.key] for p in others), default=None)
        if shortfall.largest_free_pod is not None:
            assert memory[shortfall.largest_free_pod] == shortfall.largest_free_bytes
        assert set(shortfall.slots_full) == {
            p.key for p in others if memory[p.key] >= need and slots[p.key] <= 0
        }
        assert placement.shortfall_message(shortfall).startswith(
            f"placed on {len(placed)} of {shortfall.wanted} pods: needs "
        )

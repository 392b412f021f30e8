"""Properties every layout must have, over random valid configurations (hypothesis).

The configurations cover all five dimensions, expert tensor parallelism that
differs from tp, arbitrary orders (tokens of size 1 may be left out) and, where
the sizes allow it, pp not last. Brute-force checks enumerate the whole world,
so worlds stay in the hundreds of ranks.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Optional, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from mpu_bridge import LayoutError, plan
from mpu_bridge.layout import Layout

TOKENS = ("tp", "cp", "ep", "dp", "pp")
ALL_KINDS = (
    "tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "tp-dp", "tp-dp-cp", "mp",
    "ep", "etp", "edp", "etp-ep", "etp-ep-pp",
)
MAX_WORLD = 384

#: kinds whose groups vary one dimension of a grid; pp is shared by both grids
DENSE_DIMENSIONS = ("tp", "cp", "dp", "pp")
EXPERT_DIMENSIONS = ("etp", "ep", "edp", "pp")

#: composite kind -> two kinds whose groups it is the product of
COMPOSITES = {
    "dp-cp": ("dp", "cp"),
    "tp-cp": ("tp", "cp"),
    "tp-dp": ("tp", "dp"),
    "tp-dp-cp": ("tp-dp", "cp"),
    "mp": ("tp", "pp"),
    "etp-ep": ("etp", "ep"),
    "etp-ep-pp": ("etp-ep", "pp"),
}


def _plan(world: int, sizes: dict, order: str, gpus_per_node: Optional[int]) -> Layout:
    return plan(world, order=order, gpus_per_node=gpus_per_node, **sizes)


@st.composite
def layouts(draw, *, with_nodes: bool = False) -> Layout:
    """A valid layout: divisible sizes, any order; pp moved last if the order needs it.

    Half the draws make etp·ep = tp·cp (so edp = dp), where megatron-core lets pp
    sit anywhere in the order as long as both grids agree on the pipeline groups.
    """
    tp = draw(st.sampled_from((1, 2, 3, 4, 8)))
    cp = draw(st.sampled_from((1, 2, 3)))
    pp = draw(st.sampled_from((1, 2, 3, 4)))
    if draw(st.booleans()):
        ep = draw(st.sampled_from((1, 2, 3, 4, 8)))
        etp = draw(st.sampled_from((None, 1, 2, 4)))
    else:  # etp·ep = tp·cp, so edp = dp and pp may stay off the end of the order
        etp, ep = draw(st.sampled_from(((None, cp), (1, tp * cp))))
    dense = tp * cp * pp
    expert = (tp if etp is None else etp) * ep * pp
    base = math.lcm(dense, expert)
    world = base * draw(st.integers(1, max(1, MAX_WORLD // base)))
    sizes = dict(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)

    # a token may be left out when its dimension has size 1 in both grids
    dp, edp = world // dense, world // expert
    size_one = {
        "tp": tp == 1 and etp in (None, 1),
        "cp": cp == 1,
        "ep": ep == 1,
        "dp": dp == 1 and edp == 1,
        "pp": pp == 1,
    }
    tokens = list(draw(st.permutations(TOKENS)))
    tokens = [t for t in tokens if not (size_one[t] and draw(st.booleans()))]
    order = "-".join(tokens) if tokens else "tp"  # "tp" alone: every other size is 1

    gpus_per_node = None
    if with_nodes:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        gpus_per_node = draw(st.sampled_from(divisors))
    try:
        return _plan(world, sizes, order, gpus_per_node)
    except LayoutError:
        # pp not last is only allowed when edp == dp and the pp strides agree;
        # with pp last every divisible configuration is valid
        pp_last = [t for t in tokens if t != "pp"] + ["pp"]
        return _plan(world, sizes, "-".join(pp_last), gpus_per_node)


def _dimension_sizes(layout: Layout) -> Tuple[int, ...]:
    c = layout.config
    return c.tp, c.cp, c.dp, c.pp, c.ep, c.etp, c.edp  # type: ignore[return-value]


@settings(max_examples=200)
@given(layouts())
def test_every_kind_partitions_the_world(layout):
    for kind in ALL_KINDS:
        groups = layout.groups(kind)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(layout.world_size))
        assert len(groups) == layout.num_groups(kind)
        assert all(len(group) == layout.size(kind) for group in groups)


@settings(max_examples=200)
@given(layouts())
def test_every_group_is_sorted_ascending(layout):
    for kind in ALL_KINDS:
        for group in layout.groups(kind):
            assert all(a < b for a, b in zip(group, group[1:]))


@settings(max_examples=200)
@given(layouts())
def test_group_of_group_index_and_rank_in_group_agree_with_groups(layout):
    for kind in ALL_KINDS:
        for index, group in enumerate(layout.groups(kind)):
            for position, rank in enumerate(group):
                assert layout.group_of(kind, rank) == group
                assert layout.group_index(kind, rank) == index
                assert layout.rank_in_group(kind, rank) == position


@settings(max_examples=200)
@given(layouts())
def test_iter_groups_and_group_by_index_equal_groups(layout):
    for kind in ALL_KINDS:
        groups = layout.groups(kind)
        assert list(layout.iter_groups(kind)) == groups
        assert [layout.group(kind, i) for i in range(layout.num_groups(kind))] == groups


@settings(max_examples=200)
@given(layouts())
def test_group_sizes_multiply_out_to_the_world(layout):
    tp, cp, dp, pp, ep, etp, edp = _dimension_sizes(layout)
    size = layout.size
    assert (size("tp"), size("cp"), size("dp"), size("pp")) == (tp, cp, dp, pp)
    assert (size("ep"), size("etp"), size("edp")) == (ep, etp, edp)
    assert tp * cp * dp * pp == layout.world_size
    assert etp * ep * edp * pp == layout.world_size
    assert size("dp-cp") == dp * cp
    assert size("tp-cp") == tp * cp
    assert size("tp-dp") == tp * dp
    assert size("tp-dp-cp") == tp * dp * cp
    assert size("mp") == tp * pp
    assert size("etp-ep") == etp * ep
    assert size("etp-ep-pp") == etp * ep * pp
    for kind in ALL_KINDS:
        assert size(kind) * layout.num_groups(kind) == layout.world_size


@settings(max_examples=100)
@given(layouts())
def test_groups_of_different_dimensions_meet_only_in_the_rank(layout):
    for dimensions in (DENSE_DIMENSIONS, EXPERT_DIMENSIONS):
        for first, second in itertools.combinations(dimensions, 2):
            for rank in range(layout.world_size):
                common = set(layout.group_of(first, rank)) & set(layout.group_of(second, rank))
                assert common == {rank}, (first, second, rank)


@settings(max_examples=100)
@given(layouts())
def test_composite_groups_are_products_of_their_parts(layout):
    for composite, (first, second) in COMPOSITES.items():
        for group in layout.groups(composite):
            for rank in (group[0], group[-1]):
                for a, b in ((first, second), (second, first)):
                    union = {y for x in layout.group_of(a, rank) for y in layout.group_of(b, x)}
                    assert union == set(group), (composite, a, b, rank)


@settings(max_examples=100)
@given(
    st.sampled_from((1, 2, 4)),
    st.sampled_from((1, 2, 3)),
    st.integers(1, 8),
    st.permutations(TOKENS),
)
def test_without_cp_ep_or_a_separate_etp_expert_groups_equal_dense_groups(tp, pp, dp, tokens):
    layout = plan(tp * pp * dp, tp=tp, pp=pp, order="-".join(tokens))
    assert layout.groups("etp") == layout.groups("tp")
    assert layout.groups("edp") == layout.groups("dp")
    assert layout.groups("etp-ep") == layout.groups("tp")
    assert layout.groups("etp-ep-pp") == layout.groups("mp")
    assert layout.groups("ep") == [[rank] for rank in range(layout.world_size)]


@settings(max_examples=100)
@given(layouts())
def test_planning_twice_gives_the_same_groups(layout):
    c = layout.config
    again = plan(c.world_size, tp=c.tp, pp=c.pp, cp=c.cp, ep=c.ep, etp=c.etp, order=c.order)
    assert again == layout
    for kind in ALL_KINDS:
        assert again.groups(kind) == layout.groups(kind)


@settings(max_examples=200)
@given(layouts(with_nodes=True))
def test_intra_node_agrees_with_brute_force(layout):
    gpus_per_node = layout.config.gpus_per_node
    for kind in ALL_KINDS:
        one_node_each = all(
            len({rank // gpus_per_node for rank in group}) == 1 for group in layout.groups(kind)
        )
        assert layout.intra_node(kind) is one_node_each, kind


@settings(max_examples=100)
@given(layouts(with_nodes=True), st.one_of(st.none(), st.integers(0, 6)))
def test_to_dict_is_json_and_marks_truncation(layout, max_groups):
    described = layout.to_dict(max_groups=max_groups)
    assert json.loads(json.dumps(described)) == described
    for kind, entry in described["kinds"].items():
        groups = layout.groups(kind)
        assert entry["groups"] == groups[: len(entry["groups"])]
        assert entry["truncated"] is (len(entry["groups"]) < len(groups))
        if max_groups is None:
            assert entry["groups"] == groups
        else:
            assert len(entry["groups"]) == min(max_groups, len(groups))

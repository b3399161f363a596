"""StackedStore: rows are nodes; gather/scatter, network mean and flat state dicts round-trip exactly."""

from __future__ import annotations

import io

import pytest
import torch

from fedsim.node_store import StackedStore, tree_flatten
from fedsim.params import Pytree


def _tree(seed: int = 0) -> Pytree:
    g = torch.Generator().manual_seed(seed)
    return {"layer": {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g).double()},
            "count": torch.tensor([7], dtype=torch.int64)}


def _store(n: int = 5, seed: int = 0) -> StackedStore:
    g = torch.Generator().manual_seed(seed)
    return StackedStore({"layer": {"w": torch.randn(n, 3, 2, generator=g),
                                   "b": torch.randn(n, 2, generator=g).double()},
                         "count": torch.arange(n).reshape(n, 1)})


def _same(a: Pytree, b: Pytree) -> bool:
    """Same flat keys, and bitwise-equal leaves."""
    fa, fb = tree_flatten(a), tree_flatten(b)
    return list(fa) == list(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_gather_returns_rows_in_the_order_of_the_ids():
    store = _store()
    rows = store.gather([3, 0, 3])
    assert torch.equal(rows["layer"]["w"], store.stacked["layer"]["w"][[3, 0, 3]])
    assert rows["count"].flatten().tolist() == [3, 0, 3]


def test_scatter_then_gather_round_trips_and_leaves_other_rows_alone():
    store, other = _store(), _store(seed=1)
    before = store.gather([0, 2, 4])
    values = other.gather(torch.tensor([4, 1]))
    store.scatter(torch.tensor([3, 1]), values)
    after = store.gather([3, 1])
    assert _same(after, values)
    untouched = store.gather([0, 2, 4])
    assert _same(untouched, before)


def test_scatter_rejects_duplicate_ids_bad_shapes_and_out_of_range_ids():
    store = _store()
    with pytest.raises(ValueError, match="duplicate node ids"):
        store.scatter([1, 1], store.gather([0, 2]))
    bad = store.gather([0, 2])
    bad["layer"]["w"] = bad["layer"]["w"][:, :2]
    with pytest.raises(ValueError, match="'layer/w'"):
        store.scatter([0, 2], bad)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        store.gather([5])
    with pytest.raises(ValueError, match=r"0\.\.4"):
        store.gather([-1])


def test_replicate_clones_so_writing_one_row_changes_no_other():
    tree = _tree()
    store = StackedStore.replicate(tree, 4)
    assert store.num_nodes == 4 and store.stacked["layer"]["w"].shape == (4, 3, 2)
    assert torch.equal(store.gather([2])["layer"]["w"][0], tree["layer"]["w"])
    store.scatter([1], {"layer": {"w": torch.zeros(1, 3, 2), "b": torch.zeros(1, 2, dtype=torch.float64)},
                        "count": torch.zeros(1, 1, dtype=torch.int64)})
    rows = store.gather([0, 2, 3])
    assert all(torch.equal(rows["layer"]["w"][k], tree["layer"]["w"]) for k in range(3))
    assert rows["count"].flatten().tolist() == [7, 7, 7] and tree["count"].item() == 7


def test_mean_is_the_network_average_in_each_leafs_dtype():
    store = _store()
    mean = store.mean()
    assert mean["layer"]["w"].dtype == torch.float32 and mean["layer"]["b"].dtype == torch.float64
    torch.testing.assert_close(mean["layer"]["b"], store.stacked["layer"]["b"].mean(0), rtol=0, atol=1e-15)
    assert mean["count"].item() == 2


def test_state_dict_round_trips_through_torch_save_with_weights_only():
    store = _store()
    state = store.state_dict()
    assert list(state) == ["layer/w", "layer/b", "count"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = _store(seed=9)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert _same(fresh.stacked, store.stacked)
    store.scatter([0], fresh.gather([1]))
    assert not torch.equal(state["layer/w"][0], store.stacked["layer"]["w"][0])


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("layer/b"), r"'layer/b': missing"),
    (lambda s: s.update(extra=torch.zeros(5)), r"'extra': unexpected"),
    (lambda s: s.update({"layer/w": torch.zeros(5, 2, 3)}), r"'layer/w': expected torch.float32 \(5, 3, 2\)"),
    (lambda s: s.update(count=s["count"].float()), r"'count': expected torch.int64"),
])
def test_load_state_dict_mismatch_is_a_value_error_naming_the_key(change, message):
    store = _store()
    state = store.state_dict()
    change(state)
    with pytest.raises(ValueError, match=message):
        store.load_state_dict(state)


def test_leaves_need_one_leading_node_axis_and_plain_keys():
    with pytest.raises(ValueError, match="'b'"):
        StackedStore({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="'a/b'"):
        StackedStore({"a/b": torch.zeros(3)})

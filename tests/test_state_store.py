"""SpillingStateStore: a byte budget in memory, least recently used states on disk, exact round trips."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.params import Pytree, tree_nbytes
from fedsim.runtime.context import ClientStateStore
from fedsim.runtime.state_store import SpillingStateStore


def _state(k: int, size: int = 10) -> Pytree:
    return {"c": {"w": torch.full((size,), float(k)), "b": torch.tensor(k, dtype=torch.int64)}}


def _mixed_state(k: int) -> Pytree:
    g = torch.Generator().manual_seed(k)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "nested": {
            "f64": torch.randn(5, generator=g, dtype=torch.float64),
            "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
            "empty": torch.empty(0, 7),
        },
        "i64": torch.randint(-(2**62), 2**62, (4,), generator=g),
        "mask": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(float("nan") if k % 2 else -0.0),
    }


def _bitwise_equal(a: Pytree, b: Pytree) -> bool:
    if list(a) != list(b):
        return False
    for key in a:
        u, v = a[key], b[key]
        if isinstance(u, dict):
            if not (isinstance(v, dict) and _bitwise_equal(u, v)):
                return False
        elif u.dtype != v.dtype or u.shape != v.shape or not torch.equal(_as_bytes(u), _as_bytes(v)):
            return False
    return True


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_spilled_states_read_back_bitwise_with_dtype_shape_and_key_order() -> None:
    with SpillingStateStore(memory_budget=0) as store:
        for k in range(5):
            store.put(k, _mixed_state(k))
        assert store.memory_bytes == 0 and store.spilled == 5
        assert all(_bitwise_equal(store.get(k), _mixed_state(k)) for k in (3, 0, 4, 1, 2))


def test_memory_never_holds_more_than_the_budget() -> None:
    one = tree_nbytes(_state(0))
    with SpillingStateStore(memory_budget=3 * one + one // 2) as store:
        for k in range(10):
            store.put(k, _state(k))
            assert store.memory_bytes <= store.memory_budget
        assert store.memory_bytes == 3 * one and store.spilled == 7 and len(store) == 10
        for k in range(10):
            assert _bitwise_equal(store.get(k), _state(k))
            assert store.memory_bytes <= store.memory_budget


def test_least_recently_used_states_are_the_ones_spilled() -> None:
    with SpillingStateStore(memory_budget=2 * tree_nbytes(_state(0))) as store:
        kept = {k: _state(k) for k in range(3)}
        for k, state in kept.items():
            store.put(k, state)
        assert store.get(1) is kept[1]  # 0 was spilled; 1 becomes more recent than 2
        assert store.get(0) is not kept[0]  # read back from disk, and now in memory: 2 is spilled
        assert store.spilled == 1 and store.get(1) is kept[1]
        assert store.get(2) is not kept[2] and _bitwise_equal(store.get(2), kept[2])


def test_views_into_larger_tensors_are_copied_so_counted_bytes_are_held_bytes() -> None:
    batch = torch.randn(1000, 10)
    with SpillingStateStore(memory_budget=10**6) as store:
        store.put(0, {"w": batch[3]})
        held = store.get(0)["w"]
        assert torch.equal(held, batch[3])
        assert held.untyped_storage().nbytes() == tree_nbytes({"w": held}) == 40


def test_put_none_deletes_a_state_in_memory_or_on_disk() -> None:
    with SpillingStateStore(memory_budget=tree_nbytes(_state(0))) as store:
        for k in range(3):
            store.put(k, _state(k))
        store.put(0, None)  # on disk
        store.put(2, None)  # in memory
        store.put(7, None)  # never stored
        assert store.get(0) is None and store.get(2) is None and store.get(7) is None
        assert len(store) == 1 and store.spilled == 1 and store.memory_bytes == 0


def test_put_replaces_a_spilled_state() -> None:
    with SpillingStateStore(memory_budget=0) as store:
        store.put(4, _state(1))
        store.put(4, _state(2))
        assert len(store) == 1 and _bitwise_equal(store.get(4), _state(2))


def test_behaves_like_client_state_store_under_a_mixed_workload() -> None:
    rng = np.random.default_rng(0)
    reference = ClientStateStore()
    with SpillingStateStore(memory_budget=5 * tree_nbytes(_state(0))) as store:
        for step in range(2000):
            k, op = int(rng.integers(0, 40)), rng.random()
            if op < 0.4:
                state = _state(step)
                reference.put(k, state), store.put(k, state)
            elif op < 0.5:
                reference.put(k, None), store.put(k, None)
            else:
                want, got = reference.get(k), store.get(k)
                assert (want is None) == (got is None) and (want is None or _bitwise_equal(got, want))
            assert len(store) == len(reference)


def test_structure_is_fixed_per_store() -> None:
    with SpillingStateStore(memory_budget=10**6) as store:
        store.put(0, _state(0))
        for bad in (_state(1, size=11), {"c": {"w": torch.zeros(10, dtype=torch.float64), "b": torch.tensor(0)}},
                    {"c": {"b": torch.tensor(0), "w": torch.zeros(10)}}, {"w": torch.zeros(10)}):
            with pytest.raises(ValueError, match="structure"):
                store.put(0, bad)
        assert _bitwise_equal(store.get(0), _state(0))


def test_client_ids_must_be_non_negative_integers() -> None:
    with SpillingStateStore(memory_budget=0) as store:
        store.put(np.int64(3), _state(3))
        assert _bitwise_equal(store.get(3), _state(3))
        with pytest.raises(ValueError, match="non-negative"):
            store.put(-1, _state(0))
        with pytest.raises(TypeError):
            store.get(1.5)


def test_twenty_thousand_clients_spill_and_read_back_and_freed_rows_are_reused() -> None:
    size = 1000
    with SpillingStateStore(memory_budget=2**20) as store:
        for k in range(20_000):
            store.put(k, {"w": torch.arange(size, dtype=torch.float32) + k})
        in_memory = 2**20 // (4 * size)
        assert store.spilled == 20_000 - in_memory and store.memory_bytes <= 2**20
        for k in np.random.default_rng(0).integers(0, 20_000, 2000):
            assert torch.equal(store.get(int(k))["w"], torch.arange(size, dtype=torch.float32) + int(k))
        file_bytes = sum(f.stat().st_size for f in store.spill_path.iterdir())
        for k in range(20_000):
            store.put(k, None)
        for k in range(20_000, 40_000):
            store.put(k, {"w": torch.zeros(size)})
        assert sum(f.stat().st_size for f in store.spill_path.iterdir()) == file_bytes


def test_temporary_spill_directory_is_removed_on_close_and_on_garbage_collection() -> None:
    store = SpillingStateStore(memory_budget=0)
    store.put(0, _state(0))
    path = store.spill_path
    assert path is not None and any(path.iterdir())
    store.close()
    assert not path.exists() and len(store) == 0 and store.get(0) is None

    store = SpillingStateStore(memory_budget=0)
    store.put(0, _state(0))
    path = store.spill_path
    del store
    gc.collect()
    assert not path.exists()


def test_spill_dir_holds_the_files_when_given_and_survives_close(tmp_path: Path) -> None:
    store = SpillingStateStore(memory_budget=0, spill_dir=tmp_path / "spill")
    store.put(0, _state(0))
    assert store.spill_path.parent == tmp_path / "spill"
    store.close()
    assert (tmp_path / "spill").is_dir() and not any((tmp_path / "spill").iterdir())



@pytest.mark.parametrize("store_type", ["memory", "spilling"])
def test_a_stores_state_dict_round_trips_through_a_checkpoint_tree_bitwise(store_type) -> None:
    """Exported rows (not the memory map) rebuild an equal store: same states, same ones in memory and spilled."""
    from fedsim.state_tree import flatten_state, unflatten_state

    budget = 2 * tree_nbytes(_mixed_state(0))
    make = (lambda: SpillingStateStore(memory_budget=budget)) if store_type == "spilling" else ClientStateStore
    store = make()
    for k in range(6):
        store.put(k, _mixed_state(k))
    again = make()
    again.load_state_dict(unflatten_state(*flatten_state(store.state_dict())))
    assert len(again) == 6 and all(_bitwise_equal(again.get(k), _mixed_state(k)) for k in range(6))
    if store_type == "spilling":
        restored = make()
        restored.load_state_dict(unflatten_state(*flatten_state(store.state_dict())))
        assert (restored.spilled, restored.memory_bytes) == (store.spilled, store.memory_bytes) == (4, budget)

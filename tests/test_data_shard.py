"""`FederatedData.shard`: an MPI rank's part of an in-memory data set holds only its clients' rows, keeps every
client's sizes, and refuses clients it does not hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.data import build_federated_data


@pytest.fixture
def data():
    return build_federated_data("synthetic_iid", {}, "quantity", {}, 7, seed=3)


def test_a_shard_holds_its_clients_rows_and_every_clients_sizes(data):
    owned = [1, 4, 6]
    shard = data.shard(owned)
    assert len(shard.x_train) == sum(int(data.train_sizes[k]) for k in owned)
    assert len(shard.x_test) == sum(int(data.test_sizes[k]) for k in owned)
    np.testing.assert_array_equal(shard.train_sizes, data.train_sizes)
    np.testing.assert_array_equal(shard.test_sizes, data.test_sizes)
    assert shard.num_clients == data.num_clients and shard.feature_shape == data.feature_shape
    for k in owned:
        for mine, whole in zip(shard.client_train(k) + shard.client_test(k), data.client_train(k) + data.client_test(k),
                               strict=True):
            assert torch.equal(mine, whole)


def test_a_shard_refuses_clients_it_does_not_hold(data):
    shard = data.shard([0, 2])
    with pytest.raises(LookupError, match="client 1's training data is not held here"):
        shard.client_train(1)
    with pytest.raises(LookupError, match="client 3's test data is not held here"):
        shard.client_test(3)


def test_an_empty_shard_holds_nothing(data):
    shard = data.shard([])
    assert len(shard.x_train) == 0 and len(shard.y_test) == 0
    assert (shard.train_starts == -1).all()

"""Private SpiderBoost's noise: dyadic decompositions, the closed-form variance of both estimators on a quadratic,
tree-node noise drawn once and reused bit for bit, keyed reproducibility, and the tree's accounting multiplier."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

from fedsim.keyed_random import key_from_seed
from fedsim.params import tree_leaves
from fedsim.private_spider import (
    TreeAggregator,
    checkpoint_noise,
    checkpoint_noise_std,
    difference_noise_std,
    dyadic_nodes,
    node_noise,
    node_position,
    spider_estimate_naive,
    spider_estimate_tree,
    step_length,
    step_noise,
    tree_noise_multiplier,
)

PHASE_LEAVES = 16
KEYS = 4000
DIM = 256


@pytest.mark.parametrize("start", [0, 5, 64])
def test_dyadic_nodes_partition_the_prefix_into_at_most_log_many_dyadic_blocks(start):
    assert dyadic_nodes(start, start) == []
    for t in range(start + 1, start + 65):
        nodes = dyadic_nodes(start, t)
        covered = [step for first, last in nodes for step in range(first, last + 1)]
        assert covered == list(range(start + 1, t + 1))  # disjoint, in order, exactly the prefix
        for first, last in nodes:
            size = last - first + 1
            assert size & (size - 1) == 0 and (first - start - 1) % size == 0
        assert len(nodes) <= math.floor(math.log2(t - start)) + 1
    with pytest.raises(ValueError, match="not a dyadic node"):
        node_position(start, (start + 2, start + 3))


def test_dyadic_nodes_refuse_a_prefix_before_the_phase_start():
    with pytest.raises(ValueError, match="start"):
        dyadic_nodes(3, 2)


def _quadratic_phase():
    """f(w; z) = ||w - z||^2 / 2 on 100 points, all in every batch (b1 = b2 = 100): grad f(w_s; z) - grad f(w_{s-1}; z)
    = w_s - w_{s-1} exactly, so L1 = C1 = 1 and the error of nabla_t is its noise alone.

    A fixed trajectory w_0..w_16 with step lengths 0.5, 1.0, 1.5 in turn, so leaves differ in std and a tree node's
    std (the largest of its leaves') differs from its first leaf's."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(100, DIM, generator=gen)
    directions = torch.nn.functional.normalize(torch.randn(PHASE_LEAVES, DIM, generator=gen), dim=1)
    trajectory = [torch.randn(DIM, generator=gen)]
    for s in range(PHASE_LEAVES):
        trajectory.append(trajectory[-1] - (0.5 + 0.5 * (s % 3)) * directions[s])
    checkpoint = (trajectory[0] - data).mean(0)  # gradient norms are about 23: clipping at C0 = 100 is inactive
    steps = list(zip(trajectory[:-1], trajectory[1:], strict=True))
    differences = [((w - data) - (prev - data)).mean(0) for prev, w in steps]
    checkpoint_std = checkpoint_noise_std(noise_multiplier=0.1, clip=100.0, batch_size=100.0)
    stds = [difference_noise_std(30.0, 1.0, step_length({"w": w}, {"w": prev}), batch_size=100.0)
            for prev, w in steps]
    true_gradients = [w - data.mean(0) for w in trajectory]
    return checkpoint, checkpoint_std, differences, stds, true_gradients


def _node_std(stds, node):
    return max(float(stds[step - 1]) for step in range(node[0], node[1] + 1))


@pytest.mark.parametrize("variant", ["naive", "tree"])
def test_estimator_error_variance_matches_the_closed_form_on_a_quadratic(variant):
    checkpoint, checkpoint_std, differences, stds, true_gradients = _quadratic_phase()
    estimate = spider_estimate_naive if variant == "naive" else spider_estimate_tree
    keys = torch.stack([key_from_seed(seed) for seed in range(KEYS)])
    estimates = vmap(lambda key: [e["w"] for e in estimate(key, 3, {"w": checkpoint}, checkpoint_std,
                                                           [{"w": d} for d in differences], stds)])(keys)
    for t in range(PHASE_LEAVES + 1):
        if variant == "naive":
            expected = checkpoint_std**2 + sum(float(std) ** 2 for std in stds[:t])
        else:
            expected = checkpoint_std**2 + sum(_node_std(stds, node) ** 2 for node in dyadic_nodes(0, t))
        errors = (estimates[t] - true_gradients[t]).double()
        empirical = float(errors.square().mean())  # the noise has mean zero; 1,024,000 draws per t
        standard_error = expected * math.sqrt(2 / errors.numel())
        assert abs(empirical - expected) < 6 * standard_error, (t, empirical, expected)


def test_the_two_estimators_differ_only_in_how_differences_are_noised():
    checkpoint, checkpoint_std, differences, stds, _ = _quadratic_phase()
    key = key_from_seed(11)
    args = (key, 0, {"w": checkpoint}, checkpoint_std, [{"w": d} for d in differences], stds)
    naive, tree = spider_estimate_naive(*args), spider_estimate_tree(*args)
    noisy_checkpoint = checkpoint + checkpoint_noise(key, 0, checkpoint_std, {"w": checkpoint})["w"]
    assert torch.equal(naive[0]["w"], noisy_checkpoint) and torch.equal(tree[0]["w"], noisy_checkpoint)
    fresh = step_noise(key, 0, 1, stds[0], {"w": checkpoint})["w"]
    assert torch.equal(naive[1]["w"], noisy_checkpoint + (differences[0] + fresh))
    leaf = node_noise(key, 0, 0, 0, stds[0], {"w": checkpoint})["w"]
    assert torch.equal(tree[1]["w"], noisy_checkpoint + (differences[0] + leaf))


def test_a_node_noise_is_drawn_once_and_reused_bit_for_bit_by_every_prefix_containing_it():
    like = {"a": torch.zeros(7), "b": {"c": torch.zeros(2, 3, dtype=torch.float64)}}
    key, phase, stds = key_from_seed(5), 2, [0.5, 2.0, 1.0, 1.5, 0.25, 3.0, 1.0]
    aggregator = TreeAggregator(len(stds))
    state, released = aggregator.init(like), {}
    for t, std in enumerate(stds, start=1):
        state, released[t] = aggregator.insert(state, key, phase, like, std)  # zero leaves: the release is noise
        if t >= 4:
            assert torch.equal(state["noise"]["2"]["a"], node_noise(key, phase, 2, 0, 2.0, like)["a"])
    first_four = node_noise(key, phase, 2, 0, 2.0, like)  # leaves 1-4, largest std 2.0
    leaf_five = node_noise(key, phase, 0, 4, 0.25, like)
    leaves_five_six = node_noise(key, phase, 1, 2, 3.0, like)
    for got, smaller in [(released[5], leaf_five), (released[6], leaves_five_six)]:  # both contain leaves 1-4
        for got_leaf, larger_leaf, smaller_leaf in zip(*map(tree_leaves, (got, first_four, smaller)), strict=True):
            assert torch.equal(got_leaf, larger_leaf + smaller_leaf)
    assert state["std"].tolist() == [1.0, 3.0, 2.0] and int(state["count"]) == 7


def test_a_release_is_the_exact_prefix_sum_plus_its_dyadic_nodes_noise():
    gen = torch.Generator().manual_seed(1)
    leaves = [{"w": torch.randn(4, 3, generator=gen)} for _ in range(11)]
    stds = [0.1 * (1 + s % 4) for s in range(11)]
    key, aggregator = key_from_seed(8), TreeAggregator(11)
    state = aggregator.init(leaves[0])
    for t, (leaf, std) in enumerate(zip(leaves, stds, strict=True), start=1):
        state, released = aggregator.insert(state, key, 4, leaf, std)
        want = sum(earlier["w"] for earlier in leaves[:t])
        for node in dyadic_nodes(0, t):
            level, index = node_position(0, node)
            want = want + node_noise(key, 4, level, index, _node_std(stds, node), leaves[0])["w"]
        torch.testing.assert_close(released["w"], want)


def test_same_key_gives_the_same_noise_and_other_phases_nodes_or_keys_other_noise():
    like = {"w": torch.zeros(64)}
    key = key_from_seed(3)
    reference = node_noise(key, 1, 2, 3, 1.0, like)["w"]
    assert torch.equal(reference, node_noise(key_from_seed(3), 1, 2, 3, 1.0, like)["w"])
    others = [node_noise(key, 2, 2, 3, 1.0, like), node_noise(key, 1, 1, 3, 1.0, like),
              node_noise(key, 1, 2, 4, 1.0, like), node_noise(key_from_seed(4), 1, 2, 3, 1.0, like),
              checkpoint_noise(key, 1, 1.0, like), step_noise(key, 1, 3, 1.0, like)]
    for other in others:
        assert not torch.any(other["w"] == reference)
    differences, stds = [{"w": torch.ones(64)}] * 5, [0.3] * 5
    first = spider_estimate_tree(key, 1, like, 0.2, differences, stds)
    again = spider_estimate_tree(key_from_seed(3), 1, like, 0.2, differences, stds)
    assert all(torch.equal(a["w"], b["w"]) for a, b in zip(first, again, strict=True))


def test_vmap_over_keys_and_stds_draws_what_a_loop_draws():
    like = {"w": torch.zeros(5), "b": torch.zeros(2, dtype=torch.float64)}
    differences = [{"w": torch.full((5,), float(s)), "b": torch.ones(2, dtype=torch.float64)} for s in range(6)]
    keys, scales = torch.stack([key_from_seed(s) for s in (1, 2, 3)]), torch.tensor([0.1, 0.2, 0.3])

    def estimates(key, scale):
        return spider_estimate_tree(key, 7, like, scale, differences, [scale * (s + 1) for s in range(6)])

    batched = vmap(estimates)(keys, scales)
    for i in range(3):
        for got, want in zip(batched, estimates(keys[i], scales[i]), strict=True):
            assert all(torch.equal(g[i], w) for g, w in zip(tree_leaves(got), tree_leaves(want), strict=True))


def test_a_node_takes_the_largest_std_of_its_leaves():
    like = {"w": torch.zeros(3)}
    aggregator = TreeAggregator(4)
    state = aggregator.init(like)
    for std in (1.0, 3.0, 2.0, 0.5):
        state, _ = aggregator.insert(state, key_from_seed(0), 0, like, std)
    assert state["std"].tolist() == [0.0, 0.0, 3.0]


def test_an_aggregator_refuses_more_leaves_than_its_phase():
    like = {"w": torch.zeros(2)}
    aggregator = TreeAggregator(2)
    state = aggregator.init(like)
    for _ in range(2):
        state, _ = aggregator.insert(state, key_from_seed(0), 0, like, 1.0)
    with pytest.raises(ValueError, match="2 leaves"):
        aggregator.insert(state, key_from_seed(0), 0, like, 1.0)


def test_tree_noise_multiplier_divides_by_the_root_of_the_most_nodes_one_leaf_enters():
    for phase_length in range(1, 41):
        released = {node for t in range(1, phase_length + 1) for node in dyadic_nodes(0, t)}
        most = max(sum(first <= leaf <= last for first, last in released) for leaf in range(1, phase_length + 1))
        assert most == math.floor(math.log2(phase_length)) + 1
        assert tree_noise_multiplier(2.0, phase_length) == pytest.approx(2.0 / math.sqrt(most), rel=1e-15)
    with pytest.raises(ValueError, match="leaf"):
        tree_noise_multiplier(1.0, 0)


def test_difference_noise_std_scales_with_the_step_length_up_to_the_cap():
    assert float(difference_noise_std(2.0, 0.5, 3.0, 10.0)) == pytest.approx(0.3)
    assert float(difference_noise_std(2.0, 0.5, 3.0, 10.0, cap=1.0)) == pytest.approx(0.2)
    assert checkpoint_noise_std(2.0, 0.5, 10.0) == pytest.approx(0.1)

"""The noise of private SpiderBoost (Arora, Bassily, González, Guzmán, Menart, Ullah, ICML 2023, arXiv:2206.00846,
"Faster Rates of Convergence to Stationary Points in Differentially Private Optimization"): the checkpoint release,
the naive per-step release of gradient differences and the tree-aggregation release of their prefix sums, as pure
torch functions on pytrees.

Algorithm numbers are those of the ICML version (PMLR 202): Algorithm 1 is "Tree-based Private SPIDER" (Section 3,
population risk, one pass), Algorithm 2 is "Private SpiderBoost" (Section 4.1, empirical risk). Both run phases. A
phase opens at a checkpoint step t0 with a noisy minibatch gradient and adds noisy gradient variations, so
nabla_t = nabla_t0 + sum_{s=t0+1..t} Delta_s (Alg. 2 line 14 unrolled). Per coordinate the release adds:
  checkpoint (Alg. 2 lines 8-9; Alg. 1's root): N(0, sigma_c^2) with sigma_c = sigma1 C0 / b1;
  naive (Alg. 2 lines 12-13): a fresh N(0, sigma_s^2) for each Delta_s, sigma_s = sigma2 C1 ||w_s - w_{s-1}|| / b2,
      so Var(nabla_t - E nabla_t) = sigma_c^2 + sum_s sigma_s^2;
  tree (Alg. 1's structure; the tree mechanism of Dwork, Naor, Pitassi, Rothblum 2010 and Chan, Shi, Song 2011):
      the prefix sum of Delta_{t0+1..t} is the sum of the dyadic nodes that make it up (`dyadic_nodes`). Each node
      carries one Gaussian, drawn once and reused by every later prefix that contains the node, so
      Var = sigma_c^2 + the node variances of at most floor(log2(t - t0)) + 1 nodes.

Where this departs from the paper (the template of the research notes, for `fedsim.accounting`'s ledger of
Poisson-subsampled Gaussians):
  - batches are Poisson samples of expected sizes b1 and b2, and their sums are divided by the expected size (as in
    DP-SGD). The paper draws batches of fixed size (Alg. 2 lines 7 and 11); in Alg. 1 they are disjoint, drawn
    without replacement;
  - sensitivity comes from clipping, of gradients to C0 and of differences to C1 ||w_t - w_{t-1}||. The paper's
    sigma1 and sigma2 rest on the loss being L0-Lipschitz and L1-smooth instead;
  - a tree node sums the per-step differences of its leaves. The paper's node Delta_{t,s} (Alg. 1, a right child)
    is one variation grad f(w_{t,s}) - grad f(w_{t,s^}) over the whole block, on a fresh batch of size b / 2^|s|.
    What a prefix carries in noise (one draw per node of the leaf's dyadic decomposition, shared) is the same.

Randomness: every draw is `tree_normal` under a key folded from (key, phase, what): the checkpoint, a step, or a tree
node (level, index). The same key gives the same noise on any machine, in a loop or under `torch.func.vmap`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedsim.keyed_random import fold_in, tree_normal
from fedsim.params import Pytree, tree_leaves, tree_map, tree_zeros_like

Std = float | torch.Tensor
"""A noise standard deviation: a float, or a 0-d tensor (batched under vmap, e.g. one step length per client)."""

_CHECKPOINT, _STEP, _NODE = 0, 1, 2
"""What a phase's key is folded with first, so checkpoint, step and node draws never share a key."""


def checkpoint_noise_std(noise_multiplier: float, clip: float, batch_size: float) -> float:
    """Alg. 2 line 8 in clipped form: the Gaussian mechanism on the sum of gradients clipped to C0, divided by the
    expected batch size b1, so its std is sigma1 C0 / b1."""
    return noise_multiplier * clip / batch_size


def difference_noise_std(noise_multiplier: float, clip: float, step_length: Std, batch_size: float,
                         cap: float = math.inf) -> torch.Tensor:
    """Alg. 2 line 12 in clipped form: std sigma2 min(C1 ||w_t - w_{t-1}||, cap) / b2.

    The per-example difference is clipped to C1 ||w_t - w_{t-1}||, the clipped form of the L1 ||w_t - w_{t-1}||
    smoothness bound. So the sensitivity scales with the step length, which is public (it comes from past releases).
    `cap` is the paper's sigma2-hat (the Lipschitz bound 2 L0), for use when the per-example gradients are clipped
    to L0 too. With the default (no cap) the std is sigma2 C1 ||w_t - w_{t-1}|| / b2."""
    bound = torch.clamp(torch.as_tensor(step_length, dtype=torch.float64) * clip, max=cap)
    return noise_multiplier * bound / batch_size


def step_length(params: Pytree, previous: Pytree) -> torch.Tensor:
    """||w_t - w_{t-1}|| over all leaves: the difference release's sensitivity scale."""
    squares = [torch.sum(torch.square(a - b), dtype=torch.float64)
               for a, b in zip(tree_leaves(params), tree_leaves(previous), strict=True)]
    return torch.sqrt(torch.stack(squares).sum())


def dyadic_nodes(start: int, t: int) -> list[tuple[int, int]]:
    """The dyadic intervals (first, last), inclusive and in step numbers, whose union is the phase's prefix of leaves
    start+1..t. Leaves are numbered from the phase start: a node of level k covers relative leaves i 2^k + 1 ..
    (i + 1) 2^k. One node per 1-bit of t - start, largest first, so there are at most floor(log2(t - start)) + 1.

    This is the decomposition of the tree mechanism (Dwork et al. 2010; Chan et al. 2011). In Alg. 1 the nodes are
    the right children on the path from the root to leaf t - start."""
    if start < 0 or t < start:
        raise ValueError(f"dyadic_nodes needs 0 <= start <= t, got start={start}, t={t}")
    count, first, nodes = t - start, start + 1, []
    for level in reversed(range(count.bit_length())):
        if count >> level & 1:
            nodes.append((first, first + (1 << level) - 1))
            first += 1 << level
    return nodes


def node_position(start: int, node: tuple[int, int]) -> tuple[int, int]:
    """The (level, index) of a dyadic node of the phase opened at `start`: it covers relative leaves
    index 2^level + 1 .. (index + 1) 2^level."""
    first, last = node
    size = last - first + 1
    level = size.bit_length() - 1
    if size != 1 << level or (first - start - 1) % size:
        raise ValueError(f"{node} is not a dyadic node of the phase starting at {start}")
    return level, (first - start - 1) >> level


def _gaussian(key: torch.Tensor, std: Std, like: Pytree) -> Pytree:
    """N(0, std^2) shaped like `like`, in its leaves' dtypes."""
    return tree_map(lambda z: z * std, tree_normal(key, 0, like))


def checkpoint_noise(key: torch.Tensor, phase: int, std: Std, like: Pytree) -> Pytree:
    """The checkpoint's Gaussian (Alg. 2 line 8) of phase `phase`."""
    return _gaussian(fold_in(fold_in(key, phase), _CHECKPOINT), std, like)


def step_noise(key: torch.Tensor, phase: int, step: int, std: Std, like: Pytree) -> Pytree:
    """The naive variant's fresh Gaussian for the difference at `step` of phase `phase` (Alg. 2 line 12)."""
    return _gaussian(fold_in(fold_in(fold_in(key, phase), _STEP), step), std, like)


def node_noise(key: torch.Tensor, phase: int, level: int, index: int, std: Std, like: Pytree) -> Pytree:
    """The Gaussian of tree node (level, index) of phase `phase`: the same draw every time the node is used."""
    node_key = fold_in(fold_in(fold_in(fold_in(key, phase), _NODE), level), index)
    return _gaussian(node_key, std, like)


def noisy_checkpoint(key: torch.Tensor, phase: int, checkpoint: Pytree, std: Std) -> Pytree:
    """nabla_t0 = the mean clipped gradient + N(0, std^2 I) (Alg. 2 line 9; Alg. 1's root)."""
    return tree_map(torch.add, checkpoint, checkpoint_noise(key, phase, std, checkpoint))


def naive_step(key: torch.Tensor, phase: int, step: int, previous: Pytree, difference: Pytree, std: Std) -> Pytree:
    """nabla_t = nabla_{t-1} + Delta_t + N(0, std^2 I) with fresh noise (Alg. 2 lines 12-14); `step` is t - t0."""
    noisy = tree_map(torch.add, difference, step_noise(key, phase, step, std, difference))
    return tree_map(torch.add, previous, noisy)


def _trailing_ones(count: int) -> int:
    return (~count & (count + 1)).bit_length() - 1


class TreeAggregator:
    """Tree aggregation of one phase's leaves Delta_{t0+1}, ..., Delta_{t0+L}: `insert` adds a leaf and returns the
    noisy prefix sum, the sum over `dyadic_nodes(t0, t)` of (node sum + node noise).

    A node's noise is drawn once, when its last leaf arrives (no prefix uses a node before then), from
    `node_noise(key, phase, level, index, ...)`. Every later prefix containing the node reuses that draw, which is
    why a prefix costs at most log2(L) + 1 draws of noise and not t - t0.

    Node std: each leaf comes with its own std, sigma_node times the leaf's sensitivity (for the template,
    `difference_noise_std`, which scales with ||w_s - w_{s-1}||). A node is released with the largest std of its
    leaves, all known when it completes. An example in leaf s moves every node containing s by at most s's
    sensitivity, so each node's noise is at least sigma_node times that move; `tree_noise_multiplier` relies on
    this. In Alg. 1 the step is normalized (eta_{t,s} = beta / (2^{D/2} L1 ||nabla_{t,s}||)), so every leaf has
    the same sensitivity and the largest std is the paper's fixed sigma_{t,s}^2 = 8 2^D beta^2 log(1.25/delta) /
    (b eps)^2.

    State (plain tensors, for `state_dict`):
      prefix: the exact sum of the phase's leaves;
      noise[str(k)]: the noise of the level-k node of the decomposition (zeros when bit k of count is clear);
      std: (levels,) float64, those nodes' stds;
      count: int64, the leaves inserted.
    The release is prefix + the noise of the nodes, the same as summing noisy node sums, and the state is the size
    of one noisy sum per level. Keys, values and stds may be batched under `torch.func.vmap`; count must not be.
    """

    def __init__(self, phase_length: int) -> None:
        if phase_length < 1:
            raise ValueError(f"a phase needs at least one leaf, got phase_length={phase_length}")
        self.phase_length = phase_length
        self.levels = phase_length.bit_length()

    def init(self, template: Pytree) -> Pytree:
        """The state of an empty phase, with leaves shaped like `template`."""
        device = next(tree_leaves(template)).device
        return {"prefix": tree_zeros_like(template),
                "noise": {str(level): tree_zeros_like(template) for level in range(self.levels)},
                "std": torch.zeros(self.levels, dtype=torch.float64, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device)}

    def insert(self, state: Pytree, key: torch.Tensor, phase: int, value: Pytree, std: Std) -> tuple[Pytree, Pytree]:
        """Add leaf Delta_t (its noise std `std`) and return (new state, noisy prefix sum of the phase's leaves).

        The new leaf closes the nodes of levels below k (k = trailing ones of count) into one node of level k,
        whose noise is drawn now with the largest std of its leaves."""
        count = int(state["count"])
        if count >= self.phase_length:
            raise ValueError(f"the phase has {self.phase_length} leaves, all inserted")
        level = _trailing_ones(count)
        node_std = torch.as_tensor(std, dtype=torch.float64, device=state["std"].device)
        if level:
            node_std = torch.maximum(node_std, state["std"][:level].max())
        noise = dict(state["noise"])
        for below in range(level):
            noise[str(below)] = tree_zeros_like(value)
        noise[str(level)] = node_noise(key, phase, level, count >> level, node_std, value)
        levels = torch.arange(self.levels, device=state["std"].device)
        stds = torch.where(levels == level, node_std, torch.where(levels < level, 0.0, state["std"]))
        new = {"prefix": tree_map(torch.add, state["prefix"], value), "noise": noise, "std": stds,
               "count": state["count"] + 1}
        return new, self.release(new)

    def release(self, state: Pytree) -> Pytree:
        """The noisy prefix sum: the exact sum plus the noise of the nodes of its decomposition, largest first."""
        count, total = int(state["count"]), state["prefix"]
        for level in reversed(range(self.levels)):
            if count >> level & 1:
                total = tree_map(torch.add, total, state["noise"][str(level)])
        return total


def spider_estimate_naive(key: torch.Tensor, phase: int, checkpoint: Pytree, checkpoint_std: Std,
                          differences: Sequence[Pytree], stds: Sequence[Std]) -> list[Pytree]:
    """The estimators nabla_t0, ..., nabla_t of one phase, each difference released with its own fresh noise
    (Alg. 2 lines 8-14). `checkpoint` is the mean clipped gradient at w_t0; differences[s - 1] is the mean clipped
    Delta at step t0 + s, with noise std stds[s - 1]. The last item is nabla_t."""
    estimates = [noisy_checkpoint(key, phase, checkpoint, checkpoint_std)]
    for step, (difference, std) in enumerate(zip(differences, stds, strict=True), start=1):
        estimates.append(naive_step(key, phase, step, estimates[-1], difference, std))
    return estimates


def spider_estimate_tree(key: torch.Tensor, phase: int, checkpoint: Pytree, checkpoint_std: Std,
                         differences: Sequence[Pytree], stds: Sequence[Std]) -> list[Pytree]:
    """As `spider_estimate_naive`, but nabla_t = nabla_t0 + the `TreeAggregator`'s noisy prefix sum of the
    differences (Alg. 1's estimator: the root's plus the nodes on the path to the leaf). stds[s - 1] is leaf s's std;
    a node takes the largest of its leaves'."""
    base = noisy_checkpoint(key, phase, checkpoint, checkpoint_std)
    estimates = [base]
    if not differences:
        return estimates
    aggregator = TreeAggregator(len(differences))
    state = aggregator.init(checkpoint)
    for difference, std in zip(differences, stds, strict=True):
        state, prefix = aggregator.insert(state, key, phase, difference, std)
        estimates.append(tree_map(torch.add, base, prefix))
    return estimates


def tree_noise_multiplier(sigma_node: float, phase_length: int) -> float:
    """The noise multiplier of one phase's tree release, accounted as one Gaussian mechanism:
    sigma_node / sqrt(floor(log2 L) + 1), where L = phase_length is the phase's number of leaves (q - 1 differences
    for a phase of q steps).

    Why: a node's noise is sigma_node times its sensitivity (`TreeAggregator`). The phase releases every node that
    completes within it, and a leaf lies in at most floor(log2 L) + 1 of those (one per level; leaf 1 in exactly
    that many). So if an example enters at most one leaf, the vector of all node releases moves by at most
    sqrt(floor(log2 L) + 1) node-sensitivities, in units where each node's noise is sigma_node. That is a Gaussian
    mechanism at sigma_node / sqrt(floor(log2 L) + 1). Every prefix released during the phase is post-processing.
    Leaf values chosen adaptively (w_s depends on earlier releases) keep this bound, by adaptive composition of
    Gaussians (Gaussian DP; Dong, Roth, Su 2022).

    Sampling: "at most one leaf" holds for the paper's disjoint one-pass batches (Alg. 1 draws each node's batch
    and sets S <- S \\ S_{t,s}). With Poisson sampling, record the phase as one Poisson-subsampled Gaussian at this
    multiplier and the phase's inclusion rate. That is valid when each example's inclusion in the phase is one
    Poisson draw and an included example enters one leaf. With an independent Poisson draw at every step, an
    example can enter several leaves of a phase; this reduction does not cover that case.

    The naive variant is accounted step by step instead: each difference release (Alg. 2 line 12) is one Gaussian
    at multiplier sigma2 (std / sensitivity) on that step's Poisson batch. Each checkpoint, in both variants, is one
    Gaussian at sigma1 (Alg. 2 line 8)."""
    if phase_length < 1:
        raise ValueError(f"a phase needs at least one leaf, got phase_length={phase_length}")
    if not sigma_node >= 0:
        raise ValueError(f"sigma_node must be >= 0, got {sigma_node}")
    return sigma_node / math.sqrt(phase_length.bit_length())

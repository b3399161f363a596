"""Private SpiderBoost (Arora, Bassily, González, Guzmán, Menart, Ullah, ICML 2023, Algorithm 2) as a privacy
mechanism around the `spiderboost` server rule: records' terms clipped by the clients, Gaussian noise added by the
server to every checkpoint and every gradient difference, each release accounted as a Poisson-subsampled Gaussian.

In the paper's clipped form (the paper bounds sensitivities by L0-Lipschitzness and L1-smoothness; we clip, as
DP-SGD does, so the guarantee holds for any loss):
  - checkpoint (lines 8-9): each record's gradient clipped to C0 (`clip`); noise std sigma1 C0 / b1;
  - difference (lines 12-13): each record's gradient difference clipped to min(C1 ||w_t - w_{t-1}||, cap), C1
    (`difference_clip`) the clipped form of L1 and cap (`difference_cap`, 2 C0 by default) of the Lipschitz bound
    2 L0 the paper caps the noise with (line 12's min with sigma2-hat); noise std sigma2 times that bound / b2;
so every release is the Gaussian mechanism at noise multiplier sigma1 (checkpoints) or sigma2 (differences) on a
Poisson sample of rate b1 / n or b2 / n. The step length ||w_t - w_{t-1}|| is public: it comes from past releases.

`aggregation: tree` releases a phase's differences by tree aggregation instead (Algorithm 1's estimator; Dwork et
al. 2010, Chan et al. 2011): nabla_t = nabla_t0 + the noisy prefix sum of the phase's differences, each dyadic
node's noise (sigma2 times the largest bound of its leaves) drawn once (`fedsim.private_spider.TreeAggregator`).
For that to cost log rather than linear noise, a record must enter at most one leaf of a phase, as Algorithm 1's
disjoint batches do: each record draws one uniform per phase and joins leaf j when it falls in [(j - 1) r, j r)
(`clients/spiderboost.py`), so it is in the phase with probability L r (L = q - 1 leaves, L r <= 1) and then in one
leaf. The phase's releases are accounted as one Poisson-subsampled Gaussian of rate L r at multiplier
sigma2 / sqrt(floor(log2 L) + 1) (`tree_noise_multiplier`): given its leaf, a record moves at most that many
released nodes by at most one node-std / sigma2 each, and mixing over the leaf it lands in costs no more.
b1 and b2 are expected sizes (Poisson samples; the paper draws fixed sizes). The paper's sigmas carry a universal
constant c; here the accountant (`fedsim.accounting`) gives epsilon, or calibrates sigma1 to a target epsilon
(sigma2 = `difference_noise_ratio` x sigma1).

`level: user` is our extension to federated learning, which the paper does not have: a client is the record. Clients
are sampled independently each round (`protocol: {name: synchronous, client_sampling: poisson}`, rate p); each
sends the mean of its records' terms over its whole data, clipped as a whole to the bound above; the server divides
the sum by the expected clients p N. Every release is then the Gaussian mechanism on a Poisson sample of rate p
of the clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from fedsim.accounting import SubsampledGaussian
from fedsim.errors import ScenarioError
from fedsim.keyed_random import fold_in, tree_normal
from fedsim.params import Pytree, tree_map
from fedsim.privacy import PRIVACY, AccountingParams, Population, Schedule, client_rate
from fedsim.private_spider import (
    TreeAggregator,
    checkpoint_noise_std,
    difference_noise_std,
    step_length,
    tree_noise_multiplier,
)

if TYPE_CHECKING:
    from fedsim.aggregation import Aggregate
    from fedsim.clients import ClientRule
    from fedsim.servers import ServerRule, ServerState
    from fedsim.servers.spiderboost import SpiderBoostServer, SpiderBoostServerParams

NOISE_SALT = 0x5B1D
"""The salt of the server's noise draws under its per-step key (`Aggregate.key`)."""
PHASE_SALT = 0x7EE5
"""The salt of a phase's key (the records' leaf draws), folded into its checkpoint step's key."""


class PrivateSpiderBoostParams(AccountingParams):
    """The clipping bounds, the noise multipliers and the privacy unit; how the run is accounted
    (`AccountingParams`)."""

    clip: float = Field(1.0, gt=0, description="C0: the bound on a record's gradient at a checkpoint")
    difference_clip: float = Field(1.0, gt=0, description="C1: the bound on a record's gradient difference per unit "
                                                          "of step length ||w_t - w_{t-1}|| (the clipped L1)")
    difference_cap: float | None = Field(None, gt=0, description="the bound's cap, min(C1 ||w_t - w_{t-1}||, cap) "
                                                                 "(the paper's 2 L0; default 2 clip)")
    noise_multiplier: float = Field(1.0, ge=0, description="sigma1: a checkpoint's noise std is sigma1 C0 / b1")
    difference_noise_ratio: float = Field(1.0, gt=0, description="sigma2 / sigma1: a difference's noise std is "
                                                                 "sigma2 times its bound / b2")
    level: Literal["sample", "user"] = Field(
        "sample", description="sample: a record of a client's data is protected (the paper); user: a whole client "
                              "is (our federated extension; needs Poisson client sampling)")
    aggregation: Literal["naive", "tree"] = Field(
        "naive", description="naive: fresh noise on every difference (Alg. 2); tree: tree aggregation of a phase's "
                             "differences, each record in at most one leaf of a phase (Alg. 1's estimator)")

    @property
    def cap(self) -> float:
        return 2 * self.clip if self.difference_cap is None else self.difference_cap


def spider_schedule(params: PrivateSpiderBoostParams, server: SpiderBoostServerParams,
                    population: Population) -> Schedule:
    """The releases of server steps 0 .. T - 1 at sigma1 = sigma: a checkpoint every `phase_length` steps at
    (sigma1, b1 / n), a difference otherwise at (sigma2, b2 / n); at the user level every rate is p, the clients'."""
    phase, ratio = server.phase_length, params.difference_noise_ratio
    checkpoint_rate, difference_rate = (population.client_rate,) * 2 if params.level == "user" else \
        (server.checkpoint_rate, server.difference_rate)

    def schedule(sigma: float, steps: int) -> tuple[SubsampledGaussian, ...]:
        checkpoints = -(-steps // phase)
        if params.aggregation == "naive":
            differences = SubsampledGaussian(sigma * ratio, difference_rate, steps - checkpoints)
        else:  # a phase costs its whole tree once its first leaf is out
            leaves = phase - 1
            trees = steps // phase + (steps % phase >= 2)
            differences = SubsampledGaussian(tree_noise_multiplier(sigma * ratio, leaves),
                                             min(1.0, leaves * difference_rate), trees)
        releases = (SubsampledGaussian(sigma, checkpoint_rate, checkpoints), differences)
        return tuple(r for r in releases if r.count)

    return schedule


class PrivateSpiderBoostServer:
    """The `spiderboost` server with the bound in its broadcast and noise on its estimates: nabla_t0 = the clipped
    sum / b1 + N(0, (sigma1 C0 / b1)^2), nabla_t = nabla_{t-1} + the clipped sum / b2 + N(0, (sigma2 bound_t / b2)^2)
    (b = rate x n at the sample level, p N at the user level)."""

    steps_without_results = True
    """A round that sampled no client (user level) still releases its noise and counts as a step."""

    def __init__(self, params: PrivateSpiderBoostParams, server: SpiderBoostServer, population: Population) -> None:
        self.params, self.server = params, server
        self.records = float(population.train_sizes.sum())
        self.clients = float(len(population.train_sizes))
        self.client_rate = population.client_rate
        self.tree = TreeAggregator(server.hp.phase_length - 1) if params.aggregation == "tree" else None

    @property
    def hp(self) -> Any:
        return self.server.hp

    def init(self, params: Pytree) -> ServerState:
        state = self.server.init(params)
        if self.tree is None:
            return state
        return {**state, "tree": self.tree.init(params), "checkpoint_estimate": state["nabla"],
                "phase_key": torch.zeros(2, dtype=torch.int64, device=state["step"].device)}

    def bound(self, state: ServerState) -> torch.Tensor:
        """C0 at a checkpoint, else min(C1 ||w_t - w_{t-1}||, cap): the sensitivity of one record's term."""
        if self.server.is_checkpoint(state):
            return torch.tensor(self.params.clip, dtype=torch.float64, device=state["step"].device)
        length = step_length(state["params"], state["previous"])
        return torch.clamp(length * self.params.difference_clip, max=self.params.cap)

    def broadcast(self, state: ServerState) -> Pytree:
        message = {**self.server.broadcast(state), "clip": self.bound(state)}
        one = torch.ones((), dtype=torch.float64, device=state["step"].device)
        if self.params.level == "user":
            message = {**message, "rate": one, "user": one}
        if self.tree is not None:
            leaf = int(state["step"]) % self.hp.phase_length
            message = {**message, "tree": one, "leaf": one * leaf, "phase_key": state["phase_key"]}
        return message

    def weighting(self, template: Pytree) -> dict[str, str]:
        return self.server.weighting(template)

    def expected_size(self, state: ServerState) -> float:
        """b1 or b2 (the expected records in the sample), or p N (the expected clients) at the user level."""
        if self.params.level == "user":
            return self.client_rate * self.clients
        return self.server.rate(state) * self.records

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        checkpoint, expected = self.server.is_checkpoint(state), self.expected_size(state)
        total = aggregate.sum("sum") if aggregate.count else tree_map(torch.zeros_like, state["nabla"])
        if checkpoint:
            std = checkpoint_noise_std(self.params.noise_multiplier, self.params.clip, expected)
        else:
            sigma2 = self.params.noise_multiplier * self.params.difference_noise_ratio
            std = difference_noise_std(sigma2, self.params.difference_clip,
                                       step_length(state["params"], state["previous"]), expected,
                                       self.params.cap)
        if self.tree is not None and not checkpoint:
            return self._tree_step(state, aggregate, tree_map(lambda s: s / expected, total), std)
        noise = tree_normal(fold_in(aggregate.key, NOISE_SALT), 0, total)
        term = tree_map(lambda s, z: s / expected + (std * z).to(s.dtype), total, noise)
        nabla = term if checkpoint else tree_map(torch.add, state["nabla"], term)
        new = self.server.advance(state, nabla)
        if self.tree is None:
            return new
        return {**new, "tree": self.tree.init(nabla), "checkpoint_estimate": nabla,
                "phase_key": fold_in(aggregate.key, PHASE_SALT)}

    def _tree_step(self, state: ServerState, aggregate: Aggregate, difference: Pytree,
                   std: torch.Tensor) -> ServerState:
        """nabla_t = nabla_t0 + the tree's noisy prefix sum with this leaf inserted (its node noise drawn under this
        step's key, once)."""
        phase = int(state["step"]) // self.hp.phase_length
        tree, prefix = self.tree.insert(state["tree"], fold_in(aggregate.key, NOISE_SALT), phase, difference, std)
        nabla = tree_map(torch.add, state["checkpoint_estimate"], prefix)
        return {**self.server.advance(state, nabla), "tree": tree, "checkpoint_estimate": state["checkpoint_estimate"],
                "phase_key": state["phase_key"]}


def check_private_spiderboost(params: PrivateSpiderBoostParams, spec: Any, components: dict[str, Any]) -> None:
    """Private SpiderBoost noises the `spiderboost` server's estimates, so it needs that algorithm and server; the
    sample level needs every client every round (the rates are of all records), the user level Poisson clients."""
    algorithm, server = components["algorithm"], components["server"]
    if algorithm.name != "spiderboost" or server.name != "spiderboost":
        raise ScenarioError(f"privacy.name: private_spiderboost adds its noise to SpiderBoost's estimates; use "
                            f"algorithm spiderboost with server spiderboost, not {algorithm.name!r} with "
                            f"{server.name!r}")
    rate = client_rate(components["protocol"], spec.clients_per_round, spec.num_clients)
    if params.level == "user" and rate is None:
        raise ScenarioError("protocol.client_sampling: private_spiderboost at the user level protects whole clients, "
                            "and its accountant assumes each is sampled independently each round: use protocol: "
                            "{name: synchronous, client_sampling: poisson}")
    if params.level == "user":
        for field in ("checkpoint_rate", "difference_rate"):
            if getattr(server.params, field) != 1.0:
                raise ScenarioError(f"server.{field}: at the user level every record of a sampled client takes part "
                                    f"(the clients are the sample, at the protocol's rate); leave {field} at 1")
    if params.level == "sample" and rate is not None:
        raise ScenarioError("protocol.client_sampling: private_spiderboost at the sample level samples records from "
                            "every client, so every client takes part each round; use fixed client sampling (or "
                            "level: user for Poisson client sampling)")
    if params.aggregation == "tree":
        check_tree(params, server.params)
    if params.level == "sample" and spec.clients_per_round not in (None, spec.num_clients):
        raise ScenarioError(f"clients_per_round: private_spiderboost at the sample level samples records from every "
                            f"client, so every client takes part each round; set clients_per_round: "
                            f"{spec.num_clients} (or level: user for client sampling)")


def check_tree(params: PrivateSpiderBoostParams, server: SpiderBoostServerParams) -> None:
    """Tree aggregation puts each record in at most one of a phase's L = q - 1 leaves, at rate r each: it needs
    the sample level, a leaf (q >= 2) and L r <= 1."""
    if params.level == "user":
        raise ScenarioError("privacy.aggregation: tree aggregation puts each record in one leaf of a phase; at the "
                            "user level a client takes part in every step it is sampled for: use aggregation: naive")
    leaves = server.phase_length - 1
    if leaves < 1:
        raise ScenarioError("server.phase_length: tree aggregation needs phases of at least 2 steps (a checkpoint "
                            "and a difference)")
    if leaves * server.difference_rate > 1:
        raise ScenarioError(f"server.difference_rate: under tree aggregation each record joins one of the phase's "
                            f"{leaves} leaves with probability difference_rate each, so (phase_length - 1) x "
                            f"difference_rate must be at most 1, got {leaves * server.difference_rate:.4g}")


@PRIVACY.register("private_spiderboost", params=PrivateSpiderBoostParams, wraps="server", unit="server",
                  schedule=spider_schedule, check=check_private_spiderboost)
def private_spiderboost(params: PrivateSpiderBoostParams, rule: ClientRule, server: ServerRule,
                        population: Population) -> tuple[ClientRule, PrivateSpiderBoostServer]:
    """Private SpiderBoost: the client rule clips by the broadcast bound, the server adds the noise."""
    return rule, PrivateSpiderBoostServer(params, server, population)


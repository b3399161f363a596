"""Personalized evaluation: each client's own model (`rule.personalize`: pFedMe's theta_i, Ditto's v_i, Per-FedAvg's
one-step adaptation) scored on that client's own test split, reported as the distribution over clients next to
the global model's metrics.

A rule with personal state is scored on the clients that have a state (they trained at least once); a stateless
rule on every evaluated client (all of them, or the scenario's fixed evaluation sample). Per-client figures are
laid out on one vector over the evaluated clients, so shards of clients (MPI ranks, peers) fill their own entries
and the `reduce` that adds evaluation sums over processes assembles the whole distribution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch

from fedsim.clients import Batch, ClientRule, Oracle
from fedsim.data.base import ClientDataSource
from fedsim.evaluation import Sums, no_reduce, split_sums
from fedsim.oracle import AutogradOracle
from fedsim.params import Pytree
from fedsim.runtime.context import StateStore
from fedsim.tasks import Objective

HISTOGRAM_BINS = 10
"""Bins of width 0.1 over [0, 1] for the per-client distribution of a bounded metric (accuracy)."""
WORST_FRACTION = 0.1
Scorer = Callable[[Pytree, bool, Sequence[tuple[int, int]]], Iterator[tuple[int, Sums]]]
"""(server message, whether the rule is stateful, (position, client) pairs) -> (position, test sums) of each
client that has a personal model."""


def has_personal_model(rule: ClientRule) -> bool:
    """Whether a rule keeps a personal model per client (it defines `personalize`)."""
    return callable(getattr(rule, "personalize", None))


class PersonalEvaluator:
    """Scores every evaluated client's personal model on its test split; `__call__` returns the row's figures:
    per metric (accuracy for classification, test_loss always) the mean over clients, the mean of the worst 10%
    of clients, the pooled figure (sums over all their test samples, as pFedMe reports), and for accuracy a
    histogram over [0, 1] in 10 bins; and `personal_clients`, how many clients were scored."""

    def __init__(self, rule: ClientRule, objective: Objective, data: ClientDataSource, states: StateStore,
                 evaluated: Sequence[int], mine: Sequence[int], reduce: Callable[[Sums], Sums] = no_reduce) -> None:
        self.rule, self.objective, self.data, self.states, self.reduce = rule, objective, data, states, reduce
        self.evaluated = list(evaluated)
        """Every process's evaluated clients, in the order of the per-client vectors."""
        held = set(mine)
        self.mine = [(i, k) for i, k in enumerate(self.evaluated) if k in held]
        """This process's share: (position in the vectors, client)."""
        self.oracle = AutogradOracle(objective)
        self.metrics = objective.task.metrics
        self.scorer: Scorer = self.local_scores

    def __call__(self, server_message: Pytree) -> dict[str, float | list[int]]:
        stateful = self.rule.initial_state(server_message) is not None
        n = len(self.evaluated)
        names = [*self.metrics, "loss"]
        scored = torch.zeros(n, dtype=torch.float64)
        sums = {f"{m}_{part}": torch.zeros(n, dtype=torch.float64) for m in names for part in ("sum", "count")}
        for i, test in self.scorer(server_message, stateful, self.mine):
            scored[i] = 1.0
            for m in names:
                sums[f"{m}_sum"][i] = test[m]
                sums[f"{m}_count"][i] = test["count"]
        totals = self.reduce({"scored": scored, **sums})
        return personal_figures(totals, self.metrics)

    def local_scores(self, server_message: Pytree, stateful: bool,
                     clients: Sequence[tuple[int, int]]) -> Iterator[tuple[int, Sums]]:
        """(position, test sums) of each of `clients` ((position, client) pairs) that has a personal model, from
        the client states this process holds."""
        for i, client in clients:
            state = self.states.get(client)
            if not (stateful and state is None):
                yield i, personal_test_sums(self.rule, self.objective, self.data, client, state, server_message,
                                            self.oracle)

    def with_scorer(self, scorer: Scorer) -> PersonalEvaluator:
        """This evaluator with the clients' personal models scored elsewhere (on Flower nodes, which hold the
        client states)."""
        other = copy.copy(self)
        other.scorer = scorer
        return other


def personal_test_sums(rule: ClientRule, objective: Objective, data: ClientDataSource, client: int,
                       state: Pytree | None, server_message: Pytree, oracle: Oracle) -> Sums:
    """The task's sums on `client`'s test split for its personal model, which the rule makes from the server's
    message, the client's state and its whole training split."""
    x, y = data.client_train(client)
    whole = Batch(x, y, torch.ones(len(y)), torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64))
    params = rule.personalize(server_message, state, whole, oracle)
    with torch.no_grad():
        return split_sums(objective, params, *data.client_test(client))


def personal_figures(totals: Sums, metrics: Sequence[str], prefix: str = "personal") -> dict[str, float | list[int]]:
    """The row's personal figures from the per-client vectors (see PersonalEvaluator), named `<prefix>_<metric>`;
    none when no client had a personal model yet."""
    scored = totals["scored"] > 0
    count = int(scored.sum())
    if count == 0:
        return {f"{prefix}_clients": 0}
    out: dict[str, float | list[int]] = {f"{prefix}_clients": count}
    worst = max(1, round(WORST_FRACTION * count))
    for m in [*metrics, "loss"]:
        s, c = totals[f"{m}_sum"][scored], totals[f"{m}_count"][scored]
        per_client = s / c.clamp_min(1)
        name = f"{prefix}_{m}" if m != "loss" else f"{prefix}_test_loss"
        # Worst: lowest accuracy, highest loss.
        ordered = torch.sort(per_client, descending=m == "loss").values
        out[name] = float(per_client.mean())
        out[f"{name}_worst10"] = float(ordered[:worst].mean())
        out[f"{name}_pooled"] = float(s.sum() / c.sum().clamp_min(1))
        if m != "loss":
            bins = (per_client * HISTOGRAM_BINS).floor().clamp(0, HISTOGRAM_BINS - 1).long()
            out[f"{name}_histogram"] = torch.bincount(bins, minlength=HISTOGRAM_BINS).tolist()
    return out

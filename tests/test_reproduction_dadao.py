"""DADAO (Nabli & Oyallon, ICML 2023) against D-SGD (Lian et al. 2017) on distributed ridge regression over a cycle
and a random geometric graph of 16 nodes (scenarios/dadao_repro.yaml): the bytes all nodes send until their mean
squared distance to the optimum, (1/n) sum_i ||x_i - x*||^2, falls below eps times its start and stays there.
What held on seeds 0-2: DADAO converges linearly to the optimum, while D-SGD with a constant step stalls at a
distance its step and the nodes' heterogeneity set. So DADAO needs fewer bytes for tight accuracy (3-6 times fewer
than D-SGD with the step tuned for eps 1e-2, 7.5-20 times for 1e-3), and D-SGD with a large step gets to eps 1e-1
first (0.5-0.9 times DADAO's bytes). CI runs seed 1 to eps 1e-1 and 1e-2 with short budgets; both graphs over seeds
0-2 with the file's budgets are marked slow (`pytest -m slow`; about 2 minutes), without the e3 variants (D-SGD tuned
for 1e-3, 6,000-12,000 rounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedsim
from fedsim.scenario import read_scenario_file

SCENARIO = Path(__file__).parent.parent / "scenarios" / "dadao_repro.yaml"
GRAPHS = ("ring", "geometric")


def curves(seed: int, changes: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each variant named in `changes`, run on `seed` with that variant's settings changed."""
    raw = read_scenario_file(SCENARIO)
    variants = {name: {**raw["variants"][name], **change} for name, change in changes.items()}
    result = fedsim.run({**raw, "seed": seed, "variants": variants}, write=False)
    return {name: [r for r in result.metrics.rows if r["variant"] == name] for name in changes}


def bytes_to(rows: list[dict[str, Any]], eps: float) -> int | None:
    """Bytes sent by the first row from which the nodes' distance to the optimum stays at most eps times its start
    (DADAO's distance is not monotone); None when the run ends above it."""
    start = rows[0]["node_squared_distance_to_optimum"]
    above = [k for k, r in enumerate(rows) if r["node_squared_distance_to_optimum"] > eps * start]
    settled = above[-1] + 1 if above else 0
    return rows[settled]["bytes_up"] if settled < len(rows) else None


def test_dadao_needs_fewer_bytes_for_a_tight_accuracy_and_dsgd_for_a_loose_one_reduced():
    # Seed 1, as measured (kB): to 1e-2, DADAO 43.0 on the cycle and 47.1 on the geometric graph, D-SGD tuned for
    # 1e-2 156.2 and 278.4; to 1e-1 on the cycle, DADAO 28.8 and D-SGD tuned for 1e-1 16.6.
    rows = curves(1, {"ring_dadao": {"rounds": 30}, "ring_dsgd_e1": {"rounds": 40},
                      "ring_dsgd_e2": {"rounds": 260, "evaluation.every": 5},
                      "geometric_dadao": {"rounds": 30}, "geometric_dsgd_e2": {"rounds": 250, "evaluation.every": 5}})
    for graph in GRAPHS:
        dadao, dsgd = bytes_to(rows[f"{graph}_dadao"], 1e-2), bytes_to(rows[f"{graph}_dsgd_e2"], 1e-2)
        assert dadao is not None and dsgd is not None and dsgd > 3 * dadao, (graph, dadao, dsgd)
        last = rows[f"{graph}_dadao"][-1]
        assert last["bytes_up"] == 2 * 20 * last["communication_events"]  # y + z both ways, 5 float32 each
    dadao, dsgd = bytes_to(rows["ring_dadao"], 1e-1), bytes_to(rows["ring_dsgd_e1"], 1e-1)
    assert dadao is not None and dsgd is not None and 1.4 * dsgd < dadao, (dadao, dsgd)


@pytest.mark.slow
def test_dadao_needs_fewer_bytes_for_a_tight_accuracy_and_dsgd_for_a_loose_one_full():
    variants = [f"{graph}_{method}" for graph in GRAPHS for method in ("dadao", "dsgd_e1", "dsgd_e2")]
    ratios: dict[float, list[float | None]] = {1e-1: [], 1e-2: []}
    for seed in (0, 1, 2):
        result = fedsim.run(SCENARIO, overrides={"seed": seed}, variants=variants, write=False)
        rows = {v: [r for r in result.metrics.rows if r["variant"] == v] for v in variants}
        for graph in GRAPHS:
            dadao = {eps: bytes_to(rows[f"{graph}_dadao"], eps) for eps in (1e-1, 1e-2, 1e-3)}
            assert None not in dadao.values(), (seed, graph, dadao)
            # Measured to 1e-3: DADAO 90-101 kB on the cycle, 104-204 kB on the geometric graphs; D-SGD with either
            # step never, or after 2.5 times as many bytes or more.
            for method in ("dsgd_e1", "dsgd_e2"):
                reached = bytes_to(rows[f"{graph}_{method}"], 1e-3) or rows[f"{graph}_{method}"][-1]["bytes_up"]
                assert reached > 2 * dadao[1e-3], (seed, graph, method, reached, dadao)
            for eps, method in ((1e-1, "dsgd_e1"), (1e-2, "dsgd_e2")):
                dsgd = bytes_to(rows[f"{graph}_{method}"], eps)
                ratios[eps].append(None if dsgd is None else dsgd / dadao[eps])
    # D-SGD / DADAO bytes, measured: to 1e-2 3.0-6.1 (its step stalls above 1e-2 on seed 0's cycle); to 1e-1
    # 0.50-0.90 (its step stalls above 1e-1 on seed 0's cycle)
    for eps, (low, high) in ((1e-2, (2.5, 8.0)), (1e-1, (0.4, 1.0))):
        reached = [r for r in ratios[eps] if r is not None]
        assert len(reached) >= 5 and low < min(reached) and max(reached) < high, (eps, ratios[eps])

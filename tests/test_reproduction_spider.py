"""Gradient norm against epsilon for private SpiderBoost (Arora et al., ICML 2023) and DP-SGD on scikit-learn's
digits with a tanh MLP, 100 steps each, tuned on seed 0 on a 4-setting grid per method and epsilon
(scenarios/spider_repro.yaml). The statistic is the mean of the full training gradient's norm over the evaluated
iterates (every 10 steps): the expected norm of the uniformly random output the paper analyses.

What held on seeds 0-2: every run spends its target epsilon to 1%; DP-SGD's mean falls at every doubling of epsilon
(0.5 to 8); private SpiderBoost's does not (it rises slightly from 0.5 to 1 on every seed) but its means at epsilon 4
and 8 lie below all of its means at 0.5-2 by over 0.03; private SpiderBoost beats DP-SGD only at epsilon 0.5, where
DP-SGD's random output is worse than the initial point (by 0.057-0.178) and SpiderBoost's short normalized steps
stay within 0.04 of it; from epsilon 1 on DP-SGD is lower on every seed, against the paper's prediction; gradient
descent without privacy is below every private run. CI runs seed 0 at epsilon 0.5 and 4 (about 35 s); the full runs
over seeds 0-2 are marked slow (`pytest -m slow`; about 3.5 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedsim
from fedsim.scenario import read_scenario_file

SCENARIO = Path(__file__).parent.parent / "scenarios" / "spider_repro.yaml"
METHODS = ("spider", "dpsgd")
PLAIN = "nonprivate_gd"


def summaries(seed: int, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant in `names`, run on `seed`: its target epsilon (None without privacy), the epsilon it spent, the
    initial iterate's gradient norm and the mean of grad_norm over its evaluated iterates."""
    raw = read_scenario_file(SCENARIO)
    rows = fedsim.run({**raw, "seed": seed, "variants": {n: raw["variants"][n] for n in names}},
                      write=False).metrics.rows
    out = {}
    for name in names:
        runs = [r for r in rows if r["variant"] == name]
        norms = [r["grad_norm"] for r in runs]
        assert len(norms) == 11 and runs[0]["round"] == 0, (name, len(norms))
        privacy = raw["variants"][name].get("privacy")
        out[name] = {"target": privacy["target_epsilon"] if privacy else None, "spent": runs[-1].get("epsilon_rdp"),
                     "initial": norms[0], "mean": sum(norms) / len(norms)}
    return out


def curve(runs: dict[str, dict[str, Any]], method: str) -> list[tuple[float, float]]:
    """(target epsilon, mean grad norm) of the method's variants that ran, by rising target."""
    return sorted((r["target"], r["mean"]) for name, r in runs.items() if name.startswith(f"{method}_eps"))


def check(runs: dict[str, dict[str, Any]]) -> None:
    """The qualitative result of the reproduction, on one seed's runs."""
    for name, run in runs.items():
        if run["target"] is not None:
            assert 0.99 * run["target"] <= run["spent"] <= run["target"], (name, run)
    spider, dpsgd = dict(curve(runs, "spider")), dict(curve(runs, "dpsgd"))
    assert sorted(spider) == sorted(dpsgd) and 0.5 in spider, (spider, dpsgd)
    # DP-SGD: the mean falls at every step up in epsilon.
    means = [m for _, m in sorted(dpsgd.items())]
    assert all(after < before for before, after in zip(means, means[1:], strict=False)), dpsgd
    # Private SpiderBoost: not monotone at small epsilon, but epsilon >= 4 is clearly below epsilon <= 2.
    low, high = [m for e, m in spider.items() if e <= 2], [m for e, m in spider.items() if e >= 4]
    assert max(high) < min(low) - 0.03, spider
    # The crossing: SpiderBoost lower at epsilon 0.5 (by > 0.05), DP-SGD lower at every epsilon from 1 on.
    assert spider[0.5] < dpsgd[0.5] - 0.05, (spider, dpsgd)
    assert all(dpsgd[e] < spider[e] for e in spider if e >= 1), (spider, dpsgd)
    # At epsilon 0.5 DP-SGD's random output is clearly worse than the initial point; SpiderBoost's barely moves.
    initial = runs[PLAIN]["initial"]
    assert dpsgd[0.5] > initial + 0.04 and abs(spider[0.5] - initial) < 0.05, (initial, spider[0.5], dpsgd[0.5])
    # Gradient descent without privacy is below every private run.
    assert runs[PLAIN]["mean"] < min([*spider.values(), *dpsgd.values()]) - 0.03, (runs[PLAIN], spider, dpsgd)


def test_spiderboost_beats_dpsgd_only_at_the_smallest_epsilon_reduced():
    # Seed 0, as measured (mean grad norm at epsilon 0.5 / 4): private SpiderBoost 0.358 / 0.276, DP-SGD 0.444 / 0.252,
    # gradient descent 0.189, initial iterate 0.387.
    names = [PLAIN, *(f"{m}_eps{e}" for m in METHODS for e in ("0.5", "4"))]
    check(summaries(0, names))


@pytest.mark.slow
def test_spiderboost_beats_dpsgd_only_at_the_smallest_epsilon_full():
    # Measured on seeds 0-2 (mean grad norm at epsilon 0.5 / 1 / 2 / 4 / 8): private SpiderBoost 0.337-0.358 /
    # 0.354-0.365 / 0.339-0.346 / 0.274-0.276 / 0.264-0.297, DP-SGD 0.444-0.476 / 0.324-0.345 / 0.270-0.299 /
    # 0.252-0.260 / 0.242-0.246, gradient descent 0.182-0.189. Smallest margins: DP-SGD below SpiderBoost by 0.009
    # at epsilon 1 (seed 2); SpiderBoost at epsilon >= 4 below epsilon <= 2 by 0.040 (seed 1). Initial iterate 0.387 /
    # 0.338 / 0.298: DP-SGD at 0.5 above it by 0.057-0.178, SpiderBoost within 0.039. Checked on every seed.
    names = list(read_scenario_file(SCENARIO)["variants"])
    for seed in (0, 1, 2):
        check(summaries(seed, names))

"""FedAST (Askin et al., UAI 2024) with two tasks on 40 clients in the authors' speed groups
(scenarios/fedast_repro.yaml): label-skewed digits, whose client updates disagree, and Synthetic-IID, whose updates
agree. What held on every one of seeds 0-9: the variance-based reallocation moves jobs to digits 2.3-3.2 simulated
seconds in, before either task retires, and every FedAST variant trains both tasks to their targets in a fraction of
Sync-ST's time. What did not: dynamic FedAST retired both tasks before static FedAST on 6 of the 10 seeds only
(seeds 0, 6, 8 and 9 not), so the paper's dynamic < static is not reproduced in general. CI checks the full scenario
on seeds 1 and 2, where dynamic < static < Sync-ST held; the three reported seeds run with `pytest -m slow`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import fedsim

SCENARIO = Path(__file__).parent.parent / "scenarios" / "fedast_repro.yaml"
TARGETS = {t["name"]: t["target"] for t in yaml.safe_load(SCENARIO.read_text())["protocol"]["tasks"]}


def time_to_all_targets(rows: list[dict], variant: str) -> float:
    """Simulated seconds until the variant's last task retired, after checking that every task reached its target
    (a run stopped by the budget ends with a task below it)."""
    last = {}
    for row in rows:
        if row["variant"].startswith(f"{variant}:"):
            last[row["variant"].split(":", 1)[1]] = row
    assert set(last) == set(TARGETS), last
    for task, row in last.items():
        assert row["accuracy"] >= TARGETS[task], (variant, task, row["accuracy"])
    return max(row["sim_time"] for row in last.values())


def digits_jobs_before_first_retirement(rows: list[dict], variant: str) -> set[int]:
    """Jobs in flight of the digits task at its evaluations before either task retired."""
    first = min(max(r["sim_time"] for r in rows if r["variant"] == f"{variant}:{task}") for task in TARGETS)
    return {r["jobs_in_flight"] for r in rows if r["variant"] == f"{variant}:digits" and r["sim_time"] < first}


def run(seed: int, variants: list[str]) -> tuple[list[dict], dict[str, float]]:
    rows = fedsim.run(SCENARIO, overrides={"seed": seed}, variants=variants, write=False).metrics.rows
    return rows, {v: time_to_all_targets(rows, v) for v in variants}


@pytest.mark.parametrize("seed", [1, 2])
def test_dynamic_fedast_beats_static_which_beats_sync_st_on_seeds_where_it_held(seed):
    rows, seconds = run(seed, ["dynamic", "static", "sync_st"])
    assert seconds["dynamic"] < seconds["static"] < seconds["sync_st"], seconds
    assert seconds["sync_st"] > 2 * seconds["static"], seconds
    assert max(digits_jobs_before_first_retirement(rows, "dynamic")) >= 12  # from 8: the noisy task got more jobs
    assert digits_jobs_before_first_retirement(rows, "static") == {8}


@pytest.mark.slow
def test_time_to_all_targets_over_the_three_reported_seeds():
    seconds = {}
    for seed in (0, 1, 2):
        rows, seconds[seed] = run(seed, ["dynamic", "static", "code_rule", "sync_st"])
        assert max(digits_jobs_before_first_retirement(rows, "code_rule")) == 14
        # Sync-ST with the code's first-k (6 of 8) rule: slower than every FedAST variant; on seed 0 it never brings
        # digits to its target within the budget (the slow clients' labels rarely count).
        first6 = fedsim.run(SCENARIO, overrides={"seed": seed}, variants=["sync_st_first6"], write=False)
        end = max(r["sim_time"] for r in first6.metrics.rows)
        assert end > max(seconds[seed][v] for v in ("dynamic", "static", "code_rule")), (seed, end)
    for seed, s in seconds.items():
        assert max(s["dynamic"], s["static"], s["code_rule"]) * 2 < s["sync_st"], (seed, s)
        assert s["code_rule"] < s["dynamic"] and s["code_rule"] < s["static"], (seed, s)
    # The claim not reproduced: on seed 0 digits' accuracy hovers just under its target and dynamic FedAST, whose
    # bigger digits buffer damps the swings that reach it, retires later than static FedAST.
    assert seconds[1]["dynamic"] < seconds[1]["static"] and seconds[2]["dynamic"] < seconds[2]["static"], seconds
    assert seconds[0]["dynamic"] > seconds[0]["static"], seconds

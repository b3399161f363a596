"""FedBuff (Nguyen et al., AISTATS 2022) against synchronous FedAvgM and FedAsync on label-skewed digits with 50
clients in flight and log-normal device speeds (scenarios/fedbuff_async.yaml). What held on every seed tried: FedBuff
reaches the target after several times fewer client updates than FedAsync and in several times fewer simulated
seconds than synchronous FedAvgM, as the paper says; in client updates it is level with FedAvgM, not ahead of it.
CI runs the scenario for 60 simulated seconds to 85% accuracy over two seeds; the full 150-second run to 90% over
seeds 0-2 is marked slow (`pytest -m slow`)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

import fedsim
from fedsim.timeline import Target, time_to_target

SCENARIO = Path(__file__).parent.parent / "scenarios" / "fedbuff_async.yaml"
VARIANTS = ("fedavgm_sync", "fedasync", "fedbuff")


def reached(seed: int, overrides: dict | None = None) -> dict[str, dict]:
    """Each variant's simulated seconds and client updates to the scenario's target, after checking that every
    variant reached it and ran the whole time budget."""
    result = fedsim.run(SCENARIO, overrides={"seed": seed, **(overrides or {})}, write=False)
    spec = result.scenarios[0].spec
    out = {}
    for variant in VARIANTS:
        rows = [r for r in result.metrics.rows if r["variant"] == variant]
        assert rows[-1]["sim_time"] >= spec.time_budget, (variant, rows[-1]["sim_time"])
        out[variant] = time_to_target(rows, Target("accuracy", spec.evaluation.target))
        assert out[variant]["sim_time"] is not None, (variant, max(r["accuracy"] for r in rows))
    return out


def assert_fedbuff_claims(hit: dict[str, dict], factor: float) -> None:
    """FedBuff needs `factor` times fewer client updates than FedAsync and simulated seconds than FedAvgM."""
    assert factor * hit["fedbuff"]["client_updates"] < hit["fedasync"]["client_updates"], hit
    assert factor * hit["fedbuff"]["sim_time"] < hit["fedavgm_sync"]["sim_time"], hit


@pytest.mark.parametrize("seed", [0, 1])
def test_fedbuff_needs_fewer_updates_than_fedasync_and_less_time_than_sync_reduced(seed):
    # Seeds 0-5 gave FedAsync / FedBuff updates 2.3-4.5 and FedAvgM / FedBuff seconds 2.6-4.4.
    hit = reached(seed, {"time_budget": 60.0, "evaluation.target": 0.85})
    assert_fedbuff_claims(hit, factor=2.0)


@pytest.mark.slow
def test_fedbuff_needs_fewer_updates_than_fedasync_and_less_time_than_sync_full():
    hits = [reached(seed) for seed in (0, 1, 2)]
    for hit in hits:
        # Measured: FedAsync / FedBuff updates 3.2-5.1, FedAvgM / FedBuff seconds 4.3-6.4.
        assert_fedbuff_claims(hit, factor=3.0)
    # The paper also finds FedBuff ahead of synchronous FL in client updates; not reproduced here: with 50 clients a
    # round and tuned server momentum, FedAvgM needs about as many (350-550 against FedBuff's 400-420).
    ratio = (statistics.mean(h["fedbuff"]["client_updates"] for h in hits)
             / statistics.mean(h["fedavgm_sync"]["client_updates"] for h in hits))
    assert 0.75 < ratio < 1.25, ratio

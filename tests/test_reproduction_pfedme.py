"""pFedMe paper (Synthetic(0.5, 0.5), "same params"): pFedMe's personal models (PM) beat FedAvg's and pFedMe's global
models and Per-FedAvg's personalized ones. CI runs a 10-round version on two seeds; the full scenario is marked slow
(`pytest -m slow`). Test accuracy is pFedMe's statistic: correct / test samples pooled over clients."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedsim

SCENARIO = Path(__file__).parent.parent / "scenarios" / "pfedme_synthetic.yaml"


def final_accuracies(result) -> dict[str, float]:
    """The last round's pooled test accuracy of each model: pFedMe's PM and GM, Per-FedAvg's personalized model,
    FedAvg's global model."""
    last = result.metrics.rows[-1]["round"]
    final = {row["variant"]: row for row in result.metrics.rows if row["round"] == last}
    return {"pfedme_pm": final["pfedme"]["personal_accuracy_pooled"], "pfedme_gm": final["pfedme"]["accuracy"],
            "perfedavg": final["perfedavg"]["personal_accuracy_pooled"], "fedavg": final["fedavg"]["accuracy"]}


def assert_personal_models_win(accuracy: dict[str, float]) -> None:
    """PM above every other model; the order among the others changes with the number of rounds."""
    others = {k: v for k, v in accuracy.items() if k != "pfedme_pm"}
    assert accuracy["pfedme_pm"] > max(others.values()), accuracy


@pytest.mark.parametrize("seed", [0, 1])
def test_pfedme_personal_models_beat_global_and_perfedavg_reduced(seed: int):
    result = fedsim.run(SCENARIO, overrides={"seed": seed, "rounds": 10, "evaluation.every": 10}, write=False)
    assert_personal_models_win(final_accuracies(result))


@pytest.mark.slow
def test_pfedme_personal_models_beat_global_and_perfedavg_full():
    result = fedsim.run(SCENARIO, overrides={"evaluation.every": 600}, write=False)
    assert_personal_models_win(final_accuracies(result))

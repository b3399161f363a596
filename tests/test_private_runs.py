"""A private run's accounting: every metrics row reports epsilon per accountant at the scenario's delta, from the
most local steps any client has taken (dp-accounting on the Poisson-subsampled Gaussian); the noise calibrated to a
target epsilon; a budget that stops the run before the step that would exceed it; one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

import fedsim
from fedsim import report
from fedsim.accounting import PrivacyLedger
from fedsim.cli import main
from fedsim.errors import ScenarioError
from fedsim.privacy import AccountingParams, PrivacySpend, SampleLevelSpend
from fedsim.sampling import full_steps
from fedsim.scenario import load_scenarios
from fedsim.simulation import build_simulation

SIGMA, CLIP, BATCH = 1.1, 1.0, 20


@pytest.fixture
def private(tiny) -> dict:
    """tiny with every client every round, Poisson batches of expected size 20 and DP-SGD."""
    return {**tiny, "rounds": 3, "clients_per_round": 10,
            "algorithm": {**tiny["algorithm"], "batch_size": BATCH, "sampling": "poisson"},
            "privacy": {"name": "dpsgd", "clip": CLIP, "noise_multiplier": SIGMA}}


def sizes(spec: dict) -> np.ndarray:
    return build_simulation(load_scenarios(spec)[0][0]).data.train_sizes


def expected_epsilon(spec: dict, rounds: int, sigma: float, accountant: str = "rdp", delta: float = 1e-5) -> float:
    """What the library says `rounds` rounds cost the worst client: every client runs a full job each round, each
    step a Poisson sample of rate batch / n; the bound composes the most steps at the largest rate."""
    n = sizes(spec)
    steps = rounds * int(full_steps(n, 1, BATCH, None).max())
    ledger = PrivacyLedger()
    if steps:
        ledger.record(sigma, BATCH / int(n.min()), steps)
    return ledger.epsilon(delta, accountant)


def test_every_row_reports_the_libraries_epsilon_for_the_steps_taken(private):
    rows = fedsim.run(private, write=False).metrics.rows
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["delta"] == 1e-5
        assert r["epsilon_rdp"] == pytest.approx(expected_epsilon(private, r["round"], SIGMA), rel=1e-12)
    assert 0 == rows[0]["epsilon_rdp"] < rows[1]["epsilon_rdp"] < rows[2]["epsilon_rdp"] < rows[3]["epsilon_rdp"]


def test_each_accountant_named_gets_a_column_and_pld_is_the_tighter(private):
    spec = {**private, "rounds": 1, "privacy": {**private["privacy"], "accountants": ["rdp", "pld"]}}
    last = fedsim.run(spec, write=False).metrics.rows[-1]
    assert last["epsilon_pld"] == pytest.approx(expected_epsilon(private, 1, SIGMA, "pld"), rel=1e-9)
    assert 0 < last["epsilon_pld"] < last["epsilon_rdp"]


def test_the_runtimes_and_a_partial_participation_run_count_the_same_steps(private):
    spec = {**private, "clients_per_round": 4, "rounds": 2}
    rows = {rt: fedsim.run({**spec, "runtime": {"name": rt}}, write=False).metrics.rows
            for rt in ("sequential", "vectorized")}
    assert [r["epsilon_rdp"] for r in rows["sequential"]] == [r["epsilon_rdp"] for r in rows["vectorized"]]
    # Four of ten clients a round: after two rounds no client has taken more than two full jobs.
    assert 0 < rows["sequential"][-1]["epsilon_rdp"] <= expected_epsilon(private, 2, SIGMA)


def test_a_target_epsilon_calibrates_the_noise_so_the_run_spends_it(private):
    spec = {**private, "privacy": {"name": "dpsgd", "clip": CLIP, "target_epsilon": 2.0}}
    result = fedsim.run(spec, write=False)
    spent = result.metrics.rows[-1]["epsilon_rdp"]
    assert 2.0 * 0.99 <= spent <= 2.0


def test_a_budget_stops_the_run_before_the_round_that_would_exceed_it(private):
    budget = (expected_epsilon(private, 1, SIGMA) + expected_epsilon(private, 2, SIGMA)) / 2
    spec = {**private, "rounds": 5, "privacy": {**private["privacy"], "epsilon_budget": budget}}
    rows = fedsim.run(spec, write=False).metrics.rows
    assert rows[-1]["round"] == 1 and rows[-1]["epsilon_rdp"] <= budget
    assert expected_epsilon(private, 2, SIGMA) > budget


def test_the_spend_survives_a_state_dict_round_trip():
    params = AccountingParams()
    spend = PrivacySpend(params, SampleLevelSpend(1.0, 0.1, np.zeros(4, dtype=np.int64)), step_bound=5)
    spend.commit(2, 7)
    spend.commit(2, 3)
    again = PrivacySpend(params, SampleLevelSpend(1.0, 0.1, np.zeros(4, dtype=np.int64)), step_bound=5)
    again.load_state_dict(spend.state_dict())
    assert again.metrics() == spend.metrics() and again.epsilon("rdp") > 0
    assert spend.epsilon("rdp", extra=5) > spend.epsilon("rdp")


@pytest.mark.parametrize(("privacy", "field"), [
    ({"noise_multiplier": 1.0, "target_epsilon": 2.0}, "privacy.target_epsilon"),
    ({"delta": 0.0}, "privacy.delta"),
    ({"delta": 1.0}, "privacy.delta"),
    ({"accountants": []}, "privacy.accountants"),
    ({"accountants": ["rdp", "rdp"]}, "privacy.accountants"),
    ({"accountants": ["moments"]}, "privacy.accountants"),
    ({"target_epsilon": -1.0}, "privacy.target_epsilon"),
    ({"epsilon_budget": 0.0}, "privacy.epsilon_budget"),
    ({"target_epsilon": 1e-9}, "privacy.target_epsilon"),
])
def test_bad_accounting_settings_are_one_line_errors_naming_the_field(private, privacy, field):
    with pytest.raises(ScenarioError) as exc:
        fedsim.run({**private, "privacy": {"name": "dpsgd", **privacy}}, write=False)
    assert str(exc.value).startswith(f"{field}") and "\n" not in str(exc.value)


def test_a_target_epsilon_needs_rounds(private):
    spec = {k: v for k, v in private.items() if k != "rounds"}
    spec = {**spec, "time_budget": 100.0, "privacy": {"name": "dpsgd", "target_epsilon": 2.0}}
    with pytest.raises(ScenarioError, match=r"^privacy\.target_epsilon: calibrating the noise needs"):
        fedsim.run(spec, write=False)


def test_sigma_zero_reports_no_privacy(private):
    spec = {**private, "rounds": 1, "privacy": {"name": "dpsgd", "noise_multiplier": 0.0}}
    assert math.isinf(fedsim.run(spec, write=False).metrics.rows[-1]["epsilon_rdp"])


def test_fedsim_privacy_prints_the_calibrated_noise_and_what_the_run_would_spend(private, tmp_path, capsys):
    path = tmp_path / "private.yaml"
    spec = {**private, "rounds": 4, "privacy": {"name": "dpsgd", "target_epsilon": 3.0, "accountants": ["rdp", "pld"]}}
    path.write_text(yaml.safe_dump(spec))
    assert main(["privacy", str(path)]) == 0
    header, line = capsys.readouterr().out.strip().splitlines()
    row = dict(zip(header.split(), line.split(), strict=True))
    steps = 4 * int(full_steps(sizes(spec), 1, BATCH, None).max())
    assert row["mechanism"] == "dpsgd" and int(row["releases"]) == steps
    assert 3.0 * 0.99 <= float(row["epsilon_rdp"]) <= 3.0 and float(row["epsilon_pld"]) < float(row["epsilon_rdp"])
    sigma = float(row["noise_multiplier"])
    assert expected_epsilon(spec, 4, sigma) == pytest.approx(float(row["epsilon_rdp"]), rel=1e-3)


def test_fedsim_privacy_on_a_scenario_without_privacy_is_one_line(tiny, tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["privacy", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsim: error: privacy: no variant of this scenario has a privacy section")
    assert "\n" not in err


def test_the_plot_draws_the_figures_against_epsilon(private, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig))
    rows = fedsim.run({**private, "rounds": 2}, write=False).metrics.rows
    report.write_plot(rows, tmp_path / "plot.png", "private")
    labels = [ax.get_xlabel() for ax in saved[0].axes]
    assert "epsilon (rdp, delta 1e-05)" in labels
    curve = next(ax for ax in saved[0].axes if ax.get_xlabel().startswith("epsilon")).lines[0]
    assert list(curve.get_xdata()) == [r["epsilon_rdp"] for r in rows]


@pytest.mark.parametrize(("change", "field"), [
    ({"algorithm": {"name": "fedavg", "batch_size": 20}}, "algorithm.sampling"),
    ({"privacy": {"name": "dpsgd", "noise_multiplier": 1.0, "target_epsilon": 2.0}}, "privacy.target_epsilon"),
    ({"privacy": {"name": "dpfedavg"}}, "protocol.client_sampling"),
    ({"algorithm": {"name": "fedsam", "batch_size": 20, "sampling": "poisson"}}, "privacy.name"),
    ({"algorithm": {"name": "pfedme", "batch_size": 20, "sampling": "poisson"}}, "privacy.name"),
    ({"protocol": {"name": "dsgd"}, "topology": {"name": "ring"}}, "privacy"),
    ({"data": {"name": "least_squares"}, "task": {"name": "regression", "ridge": 0.1}, "model": {"name": "linear"}},
     "task.ridge"),
    ({"protocol": {"name": "synchronous", "client_sampling": "poisson"}, "privacy": {"name": "dpfedavg"},
      "compression": {"uplink": {"name": "random_k", "ratio": 0.1}}}, "compression.uplink"),
    ({"protocol": {"name": "synchronous", "client_sampling": "poisson"},
      "privacy": {"name": "dpfedavg", "adaptive_clip": True},
      "compression": {"downlink": {"name": "qsgd", "levels": 4}}}, "compression.downlink"),
], ids=["fixed-batches", "noise-and-target", "fixed-client-sampling", "fedsam-two-gradients", "pfedme-k-gradients",
        "gossip", "ridge-penalty", "dpfedavg-uplink-codec", "adaptive-clip-downlink-codec"])
def test_fedsim_check_reports_what_a_private_run_cannot_honour_before_building_anything(private, change, field):
    with pytest.raises(ScenarioError, match=rf"^{field}: "):
        load_scenarios({**private, **change})


def test_fedsim_privacy_needs_rounds_to_plan_by(private, tmp_path, capsys):
    spec = {k: v for k, v in private.items() if k != "rounds"}
    path = tmp_path / "timed.yaml"
    path.write_text(yaml.safe_dump({**spec, "time_budget": 50.0}))
    assert main(["privacy", str(path)]) == 2
    assert capsys.readouterr().err.startswith("fedsim: error: rounds: fedsim privacy plans a run by its rounds")

"""CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019) against exact D-SGD on a ring of 16 digits nodes
(scenarios/choco_repro.yaml): the bytes all nodes send until the network-average model first reaches test accuracy
0.85, and the consensus error compressed gossip leaves. What held on seeds 0-2: CHOCO with top-10% needs 4.2-5.0x
fewer bytes than exact gossip and with top-1% 17-31x fewer, while sending top-k of the models themselves (no public
copies) leaves 14-20x CHOCO's consensus error. CI runs seed 0 for 40 rounds without the top-1% and QSGD variants; all
variants over seeds 0-2 with the file's budgets are marked slow (`pytest -m slow`; about 1.5 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedsim
from fedsim.scenario import read_scenario_file

SCENARIO = Path(__file__).parent.parent / "scenarios" / "choco_repro.yaml"
TARGET = 0.85


def curves(seed: int, names: tuple[str, ...], **overrides: Any) -> dict[str, list[dict[str, Any]]]:
    """The rows of each named variant, run on `seed` with the file's settings changed by `overrides`."""
    raw = read_scenario_file(SCENARIO)
    result = fedsim.run({**raw, **overrides, "seed": seed, "variants": {n: raw["variants"][n] for n in names}},
                        write=False)
    return {name: [r for r in result.metrics.rows if r["variant"] == name] for name in names}


def bytes_to_target(rows: list[dict[str, Any]]) -> int | None:
    """Bytes sent by the first row at accuracy TARGET or better; None when none gets there."""
    return next((r["bytes_up"] for r in rows if r["accuracy"] >= TARGET), None)


def test_choco_reaches_the_accuracy_with_a_fraction_of_exact_gossips_bytes_reduced():
    # Seed 0, as measured: exact gossip reaches 0.85 at 15.4 MB, CHOCO top-10% at 3.7 MB; at round 40 the consensus
    # error is 0.88 for CHOCO and 10.4 for naive top-10%.
    rows = curves(0, ("exact", "choco_top10", "naive_top10"), rounds=40)
    exact, choco = bytes_to_target(rows["exact"]), bytes_to_target(rows["choco_top10"])
    assert exact is not None and choco is not None and 3 * choco < exact, (exact, choco)
    assert rows["naive_top10"][-1]["consensus_error"] > 5 * rows["choco_top10"][-1]["consensus_error"]


@pytest.mark.slow
def test_choco_reaches_the_accuracy_with_a_fraction_of_exact_gossips_bytes_full():
    names = ("exact", "choco_top10", "choco_top1", "choco_qsgd16", "naive_top10")
    for seed in (0, 1, 2):
        rows = curves(seed, names)
        exact = bytes_to_target(rows["exact"])
        assert exact is not None
        for name, factor in (("choco_top10", 4), ("choco_top1", 15), ("choco_qsgd16", 4)):
            reached = bytes_to_target(rows[name])
            assert reached is not None and factor * reached < exact, (seed, name, reached, exact)
        assert rows["naive_top10"][-1]["consensus_error"] > 10 * rows["choco_top10"][-1]["consensus_error"], seed

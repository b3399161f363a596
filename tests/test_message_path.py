"""Codecs on the message path: uplink and downlink compression in real runs, exact payload bytes, per-client
error-feedback state kept apart from the rule's, the same numbers in every runtime."""

from __future__ import annotations

import pytest

import fedsim
from fedsim.errors import ScenarioError
from fedsim.protocol import SAMPLE_COUNT_BYTES

MODEL_BYTES = (64 * 10 + 10) * 4
"""logreg on digits: a 64 x 10 kernel and 10 biases in float32."""


def rows(result):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in result.metrics.rows]


def test_lossless_topk_on_both_links_gives_the_uncompressed_run_bit_for_bit(tiny):
    plain = fedsim.run(tiny, write=False)
    lossless = {"uplink": {"name": "topk", "ratio": 1.0, "error_feedback": True}, "downlink": {"name": "topk",
                                                                                               "k": 10**6}}
    compressed = fedsim.run({**tiny, "compression": lossless}, write=False)
    for a, b in zip(rows(plain), rows(compressed), strict=True):
        # Lossless top-k sends more bytes (indices too), so only simulated time and traffic differ.
        assert {k: v for k, v in a.items() if k not in ("sim_time", "bytes_up", "bytes_down")} == \
            {k: v for k, v in b.items() if k not in ("sim_time", "bytes_up", "bytes_down")}


def test_reported_bytes_are_the_payloads_indices_and_values(tiny):
    k = 65
    r = fedsim.run({**tiny, "rounds": 2, "compression": {"uplink": {"name": "topk", "k": k}}}, write=False)
    last = r.metrics.last()
    jobs = 2 * tiny["clients_per_round"]
    # int32 indices and float32 values, plus each message's sample count.
    assert last["bytes_up"] == jobs * (k * (4 + 4) + SAMPLE_COUNT_BYTES)
    assert last["bytes_down"] == jobs * MODEL_BYTES


def test_downlink_compression_changes_what_clients_start_from_and_its_bytes(tiny):
    plain = fedsim.run({**tiny, "rounds": 2}, write=False)
    sparse = fedsim.run({**tiny, "rounds": 2, "compression": {"downlink": {"name": "topk", "ratio": 0.25}}},
                        write=False)
    assert sparse.metrics.last()["bytes_down"] < plain.metrics.last()["bytes_down"]
    assert sparse.metrics.last()["loss"] != plain.metrics.last()["loss"]


@pytest.mark.parametrize("feedback", [False, True])
def test_compressed_runs_agree_across_runtimes(tiny, feedback):
    compression = {"uplink": {"name": "topk", "ratio": 0.1, "error_feedback": feedback}}
    tiny = {**tiny, "rounds": 4, "num_clients": 5, "compression": compression}
    seq = fedsim.run({**tiny, "runtime": {"name": "sequential"}}, write=False)
    vec = fedsim.run({**tiny, "runtime": {"name": "vectorized"}}, write=False)
    for a, b in zip(seq.metrics.rows, vec.metrics.rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["bytes_up"] == b["bytes_up"]


def test_error_feedback_residuals_persist_per_client_and_change_the_run(tiny):
    # Every client every round, so each one's residual is carried into its next message.
    tiny = {**tiny, "rounds": 4, "num_clients": 4, "clients_per_round": 4}
    plain = fedsim.run({**tiny, "compression": {"uplink": {"name": "topk", "ratio": 0.05}}}, write=False)
    fed_back = fedsim.run({**tiny, "compression": {"uplink": {"name": "topk", "ratio": 0.05,
                                                              "error_feedback": True}}}, write=False)
    assert plain.metrics.rows[1]["loss"] == fed_back.metrics.rows[1]["loss"]  # first round: residuals are zero
    assert plain.metrics.last()["loss"] != fed_back.metrics.last()["loss"]


def test_a_bad_codec_is_one_line_naming_the_field(tiny):
    with pytest.raises(ScenarioError, match=r"^compression\.uplink"):
        fedsim.run({**tiny, "compression": {"uplink": {"name": "topk", "ratio": 0}}}, write=False)
    with pytest.raises(ScenarioError, match=r"^compression\.downlnk: unknown field .*did you mean downlink"):
        fedsim.run({**tiny, "compression": {"downlnk": {"name": "topk", "ratio": 0.5}}}, write=False)

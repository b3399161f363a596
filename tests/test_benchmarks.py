"""The benchmarks keep running: a quick pass prints the ratio line (times themselves are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_benchmark(name: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_sequential_benchmark_quick_prints_its_ratios():
    out = run_benchmark("sequential.py")
    ratios = json.loads(out.strip().splitlines()[-1])
    assert set(ratios) == {f"sequential_over_handwritten{s}" for s in
                           ("", "_logreg_10", "_logreg_100", "_mlp_10", "_mlp_100")}
    assert all(r > 0 for r in ratios.values())


def test_memory_benchmark_quick_prints_its_figures():
    out = run_benchmark("memory.py")
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["population_100000_peak_rss_mb"] > 0 and figures["baseline_peak_rss_mb"] > 0
    if "MPI skipped" not in out:
        assert figures["in_memory_rank1_over_single"] > 0 and figures["mpi_rank_over_single"] > 0


def test_runtimes_benchmark_quick_prints_its_ratios():
    ratios = json.loads(run_benchmark("runtimes.py").strip().splitlines()[-1])
    for name in ("sequential_over_vectorized", "vectorized_over_handvmap", "handloop_over_vectorized"):
        assert {name, f"{name}_logreg_100", f"{name}_mlp_100"} <= set(ratios)
    assert all(r > 0 for r in ratios.values())


def test_algorithms_benchmark_quick_prints_every_algorithms_ratios_to_fedavg():
    from fedsim.clients import ALGORITHMS

    out = run_benchmark("algorithms.py")
    ratios = json.loads(out.strip().splitlines()[-1])
    names = [n for n in ALGORITHMS.names() if n != "fedavg" and f"skipped: {n}:" not in out]
    assert {"fedprox", "scaffold", "fedsam", "pfedme"} <= set(names)
    assert set(ratios) == {f"{n}_over_fedavg" for n in names} | {f"{n}_step_over_fedavg_step" for n in names}
    assert all(ratios[f"{n}_over_fedavg"] > 0 for n in names)


def test_asynchronous_benchmark_quick_prints_fedbuff_against_synchronous_throughput():
    figures = json.loads(run_benchmark("asynchronous.py").strip().splitlines()[-1])
    assert figures["async_over_sync_updates_per_s"] > 0
    assert figures["fedbuff_peak_rss_mb"] > 0 and figures["sync_events_per_s"] > 0


def test_gossip_benchmark_quick_prints_fedsim_against_the_handwritten_round_and_dadao_events():
    figures = json.loads(run_benchmark("gossip.py").strip().splitlines()[-1])
    assert figures["gossip_fedsim_over_handwritten"] > 0 and figures["gossip_fedsim_peak_rss_mb"] > 0
    assert figures["dadao_events"] > 1000 and figures["dadao_fedsim_over_handwritten"] > 0
    assert figures["dadao_fedsim_peak_rss_mb"] > 0 and figures["dadao_handwritten_peak_rss_mb"] > 0
    assert figures["dadao_average_relative_difference"] < 1e-5  # same events and constants: the same run


def test_compression_benchmark_quick_prints_every_codecs_time_and_bytes_against_uncompressed():
    figures = json.loads(run_benchmark("compression.py").strip().splitlines()[-1])
    codecs = ["topk", "random_k", "random_k_biased", "qsgd", "sign", "natural", "powersgd", "topk_ef14",
              "topk_econtrol"]
    for name in codecs:
        assert figures[f"{name}_over_uncompressed"] > 0 and figures[f"{name}_cpu_over_uncompressed"] > 0
        assert 0 < figures[f"{name}_bytes_over_uncompressed"] < 1
    assert figures["uncompressed_bytes_up_per_round"] >= 100 * 14_210 * 4  # 100 float32 models a round
    assert figures["worst_over_uncompressed"] == max(figures[f"{n}_over_uncompressed"] for n in codecs)

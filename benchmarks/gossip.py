"""Gossip at scale: a D-SGD round over 10,000 nodes and DADAO over 10^6 events through fedsim, each against the same
written by hand.

D-SGD (`gossip_round`). What: a random geometric graph of 10,000 nodes (topology `random_geometric`, radius 0.03:
about 28 neighbours per node, made connected), a logistic-regression model per node (`synthetic_iid`, 60 features,
10 classes), and rounds of D-SGD as the issue defines them: one local SGD step per node on a minibatch of 10 (lr
0.05), then one mixing step with the Metropolis-Hastings matrix W of the graph (adapt-then-combine). Two
implementations, each in its own fresh process:
  fedsim       `protocol: dsgd` with `local_steps: 1` under the vectorized runtime, built as `fedsim.run` builds
               it and driven by its own clock; a round is the time between the ends of two consecutive round
               events (evaluation runs only with the first and the last event, which are not counted)
  handwritten  what a strong user writes with torch: the nodes' parameters stacked on a node axis, every node's
               minibatch indices drawn in one batched call (uniform with replacement), one
               `vmap(grad(cross-entropy of functional_call))` step over all nodes, and one `torch.sparse.mm` of the
               same W (taken from the fedsim protocol's own graph) with the nodes' flattened parameters
Seconds per round are the median over the rounds after a first, warm-up one. The numbers differ between the two
(the hand-written round samples its minibatches its own way); the work per round is the same.

DADAO (`dadao_events`; Nabli & Oyallon 2023, `servers/dadao.py`). What: 1,000 nodes on a random geometric graph
(radius 0.08: about 18 neighbours per node, made connected; lambda_mix = sqrt(2 chi_1 chi_2) about 16,000, so
about 16 communications per gradient event), ridge regression on `least_squares` data (10 features, 45 training
rows per node, ridge 0.1; L and mu computed from the nodes' Hessians) with full-batch gradients, for 60 units of
DADAO time: about 1.03 million events (gradient and communication events, as the rows count them). Two
implementations, each in its own fresh process:
  fedsim       `protocol: dadao` with `algorithm: gradient` under the vectorized runtime, built as `fedsim.run`
               builds it and driven by its own clock: it draws each unit's events, runs them in dependency layers
               (per layer one batched matrix exponential, then one `run_jobs` call for the gradients or one batched
               communication step) and keeps the bookkeeping rows report
  handwritten  what a strong user writes with torch: every node's six vectors stacked in one (nodes, 6, d) tensor,
               the same events, layers and constants (L, mu, the 6 x 6 ODE matrix, taken from the fedsim protocol
               and its event stream before the timing, as the D-SGD one takes W), per layer one batched
               `matrix_exp` of the same matrix (in float64, as fedsim) and the jumps as one broadcast update, ridge
               gradients in closed form (one pair of batched matrix products over the layer's nodes)
Seconds per 10^6 events are over the units after the first (the first pays one-off warm-up); events from fedsim's
counters, which are the rows' `gradient_events` + `communication_events`. The two run the same events with the same
constants, so their final network averages (each node's x integrated to the end) must agree to float tolerance:
the benchmark prints their relative difference (about 1e-7: float32 states, gradients summed in another order).

Both measurements hold the same data in both implementations (built by fedsim in each process) and run with one
torch thread; each side runs twice, alternating, and reports its faster trial. Peak memory is the process's peak
resident set size (mostly the data set and libraries, alike in both), and the resident size when the timed part
starts is printed next to it.

Why: issue 13 asks that a gossip round stay within 1.25x of the hand-written round at 10,000 nodes, and for DADAO
at 10^6 events the time, the ratio to the hand-written version and peak memory (reported, never asserted): node
states stay stacked end to end, and fedsim's per-node work (keyed minibatch permutations, bookkeeping of jobs, work
and bytes for the virtual clock, the network average, drawing DADAO's events and layering them) must cost little
next to the arithmetic.

The last line printed is one JSON object of figures, each measurement's keys prefixed by its name (`gossip_`,
`dadao_`); `gossip_fedsim_over_handwritten` is the ratio of seconds per round, `dadao_fedsim_over_handwritten` of
seconds per 10^6 events. `--measure gossip|dadao` runs one of them. `--quick` runs small versions once each
(seconds): D-SGD on 1,000 nodes (radius 0.08) for a few rounds, DADAO on 200 nodes (radius 0.2) for 4 units of time
(about 6,000 events).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LR, BATCH = 0.05, 10
FEATURES, RIDGE = 10, 0.1


def gossip_scenario(nodes: int, rounds: int, radius: float) -> dict[str, Any]:
    """D-SGD with one local step per node and round on a connected random geometric graph."""
    return {"name": "gossip", "seed": 0, "rounds": rounds, "num_clients": nodes,
            "data": {"name": "synthetic_iid"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": LR, "batch_size": BATCH},
            "protocol": {"name": "dsgd", "local_steps": 1},
            "topology": {"name": "random_geometric", "radius": radius, "connect": True},
            "runtime": {"name": "vectorized"}, "evaluation": {"every": rounds}}


def build_protocol(mapping: dict[str, Any]) -> Any:
    """The scenario's protocol, built as `fedsim.run` builds it (not started)."""
    from fedsim.recording import Recorder
    from fedsim.scenario import load_scenarios
    from fedsim.simulation import build_simulation

    [resolved], _ = load_scenarios(mapping)
    sim = build_simulation(resolved)
    component = resolved.components["protocol"]
    return component.entry.obj(component.params, sim, Recorder(resolved.variant, sim.evaluator))


def rss_mb() -> float:
    """This process's resident set size now, in MB."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1]) if Path("/proc/self/statm").exists() else 0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fedsim_gossip(mapping: dict[str, Any]) -> dict[str, Any]:
    """fedsim's rounds on its own clock: seconds between the ends of consecutive round events."""
    import torch

    from fedsim.clock import Clock

    torch.set_num_threads(1)
    protocol = build_protocol(mapping)
    before = rss_mb()
    stamps: list[float] = []
    clock = Clock()
    protocol.start(clock)
    clock.run(protocol, lambda _: stamps.append(time.perf_counter()))
    rounds = [b - a for a, b in zip(stamps[:-1], stamps[1:-1], strict=False)]  # events 1..R-1: rounds only
    graph = protocol.topology.graph(0)
    return {"round_s": statistics.median(rounds[1:]), "rounds": len(rounds), "rss_before_mb": before,
            "peak_rss_mb": peak_rss_mb(), "loss": protocol.recorder.rows[-1]["loss"],
            "mean_degree": 2 * graph.number_of_edges() / graph.number_of_nodes()}


def handwritten_gossip(mapping: dict[str, Any]) -> dict[str, Any]:
    """The same rounds written by hand over stacked parameters (data, model and W from fedsim's protocol)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(1)
    protocol = build_protocol(mapping)
    data, module = protocol.sim.data, protocol.sim.model.template
    x, y = data.x_train, data.y_train
    n = data.num_clients
    first, size = torch.as_tensor(data.train_starts)[:, None], torch.as_tensor(data.train_sizes)[:, None]
    W = protocol.graphs.mixing(0).to(torch.float32)
    params = {k: v.detach().unsqueeze(0).repeat(n, *(1,) * v.ndim) for k, v in protocol.sim.model.init_params.items()}
    del protocol
    before = rss_mb()

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, p, (xb,)), yb)

    step = vmap(grad(loss))
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(mapping["rounds"] - 1):
        began = time.perf_counter()
        rows = first + (torch.rand(n, BATCH, generator=generator) * size).long()
        grads = step(params, x[rows], y[rows])
        half = torch.cat([(params[k] - LR * grads[k]).reshape(n, -1) for k in params], dim=1)
        mixed = torch.sparse.mm(W, half)
        params, at = {}, 0
        for k, v in grads.items():
            width = v[0].numel()
            params[k] = mixed[:, at : at + width].reshape(v.shape)
            at += width
        seconds.append(time.perf_counter() - began)
    return {"round_s": statistics.median(seconds[1:]), "rounds": len(seconds), "rss_before_mb": before,
            "peak_rss_mb": peak_rss_mb()}


def dadao_scenario(nodes: int, units: int, radius: float) -> dict[str, Any]:
    """DADAO on distributed ridge regression (full-batch gradients) over a connected random geometric graph."""
    return {"name": "dadao", "seed": 0, "rounds": units, "num_clients": nodes,
            "data": {"name": "least_squares", "num_features": FEATURES, "samples_per_client": 50},
            "model": {"name": "linear"}, "task": {"name": "regression", "ridge": RIDGE},
            "algorithm": {"name": "gradient", "batch_size": 64}, "protocol": {"name": "dadao"},
            "topology": {"name": "random_geometric", "radius": radius, "connect": True},
            "runtime": {"name": "vectorized"}, "evaluation": {"every": units}}


def fedsim_dadao(mapping: dict[str, Any]) -> dict[str, Any]:
    """fedsim's units of DADAO time on its own clock: seconds and events (the protocol's counters, which the rows
    report) from the end of the first unit to the end of the last."""
    import torch

    from fedsim.clock import Clock

    torch.set_num_threads(1)
    protocol = build_protocol(mapping)
    before = rss_mb()
    stamps: list[tuple[float, int]] = []
    clock = Clock()
    protocol.start(clock)
    clock.run(protocol, lambda _: stamps.append((time.perf_counter(),
                                                 int(protocol.gradients.sum()) + protocol.communications)))
    (began, first), (ended, last) = stamps[0], stamps[-2]  # after unit 0 (and row 0), after the last unit
    row = protocol.recorder.rows[-1]
    assert row["gradient_events"] + row["communication_events"] == last
    return {"seconds": ended - began, "events": last - first, "total_events": last,
            "gradient_events": row["gradient_events"], "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
            "average": protocol.state["params"]["1.weight"].double().reshape(-1).tolist(),
            "rate_mix": protocol.rate_mix}


def handwritten_dadao(mapping: dict[str, Any]) -> dict[str, Any]:
    """The same DADAO written by hand: every node's six vectors stacked in one (nodes, 6, d) tensor, the events,
    layers and constants of fedsim's protocol (drawn before the timing), per layer one batched matrix exponential
    and the jumps, ridge gradients in closed form."""
    import torch

    torch.set_num_threads(1)
    protocol = build_protocol(mapping)
    data, c, M, stream = protocol.sim.data, protocol.constants, protocol.M, protocol.events
    n, m = data.num_clients, int(data.train_sizes[0])
    assert (data.train_sizes == m).all(), "every node holds as many training rows"
    rows = torch.as_tensor(data.train_starts)[:, None] + torch.arange(m)
    A, b = data.x_train[rows].reshape(n, m, -1), data.y_train[rows].unsqueeze(-1)
    ridge = protocol.sim.objective.task.ridge
    S = torch.zeros(n, 6, A.shape[2])
    S[:, 0] = protocol.sim.model.init_params["1.weight"].reshape(-1)
    t_last = torch.zeros(n, dtype=torch.float64)
    on_gradient = torch.tensor([-c.gamma, -c.gamma_tilde, 0, c.delta + c.delta_tilde, 0, 0])[:, None]
    on_message = torch.tensor([0, 0, 0, 0, -c.beta, -c.beta_tilde])[:, None]
    units = [(unit, unit.layers()) for unit in map(stream.unit, range(mapping["rounds"]))]
    del protocol
    before = rss_mb()

    def advance(nodes: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The nodes' states integrated to their times t: expm(M (t - t_last)) S, in float64."""
        E = torch.linalg.matrix_exp(M * (t - t_last[nodes])[:, None, None])
        t_last[nodes] = t
        return torch.bmm(E, S[nodes].double()).to(S.dtype)

    stamps = []
    for unit, layers in units:
        node, partner, times = (torch.from_numpy(a) for a in (unit.node, unit.partner, unit.times))
        for layer in layers:
            at = torch.from_numpy(layer)
            i, j, t = node[at], partner[at], times[at]
            if j[0] < 0:
                s = advance(i, t)
                x = s[:, 0, :, None]
                grad = (A[i].mT @ (A[i] @ x - b[i]) / m + ridge * x).squeeze(-1)
                s += on_gradient * (grad - c.nu * s[:, 0] - s[:, 3])[:, None]
                S[i] = s
            else:
                ends = torch.cat([i, j])
                s = advance(ends, torch.cat([t, t]))
                gap = s[: len(i), 2] + s[: len(i), 4] - s[len(i) :, 2] - s[len(i) :, 4]
                s += on_message * torch.cat([gap, -gap])[:, None]
                S[ends] = s
        stamps.append((time.perf_counter(), len(unit.times)))
    E = torch.linalg.matrix_exp(M * (mapping["rounds"] - t_last)[:, None, None])[:, :1]
    average = torch.bmm(E, S.double()).to(S.dtype).double().mean(0).reshape(-1)
    return {"seconds": stamps[-1][0] - stamps[0][0], "events": sum(e for _, e in stamps[1:]),
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "average": average.tolist()}


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "fedsim": fedsim_gossip, "handwritten": handwritten_gossip,
    "fedsim_dadao": fedsim_dadao, "handwritten_dadao": handwritten_dadao}


def measure(worker: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a fresh process; it writes its report to a file."""
    with tempfile.TemporaryDirectory() as directory:
        report = Path(directory) / "report.json"
        subprocess.run([sys.executable, __file__, "--worker", worker, json.dumps(mapping), str(report)], check=True)
        return json.loads(report.read_text())


def gossip_round(nodes: int, rounds: int, radius: float, trials: int) -> dict[str, float]:
    """fedsim's D-SGD round against the hand-written one; prints both and returns the figures."""
    mapping = gossip_scenario(nodes, rounds, radius)
    workers = ("fedsim", "handwritten")
    runs = [{name: measure(name, mapping) for name in workers} for _ in range(trials)]
    best = {name: min((r[name] for r in runs), key=lambda r: r["round_s"]) for name in workers}
    print(f"gossip: {nodes:,} nodes, random geometric graph (radius {radius}, mean degree "
          f"{best['fedsim']['mean_degree']:.1f}), logreg, 1 local step + 1 mixing step per round")
    for name, r in best.items():
        print(f"  {name:12s} {r['round_s'] * 1e3:8.1f} ms/round (median of {r['rounds'] - 1}), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB ({r['rss_before_mb']:.0f} MB when the rounds start)")
    ratio = best["fedsim"]["round_s"] / best["handwritten"]["round_s"]
    print(f"  fedsim / handwritten: {ratio:.2f} (target 1.25)")
    return {"gossip_nodes": nodes, "gossip_fedsim_round_s": round(best["fedsim"]["round_s"], 5),
            "gossip_handwritten_round_s": round(best["handwritten"]["round_s"], 5),
            "gossip_fedsim_over_handwritten": round(ratio, 3),
            "gossip_fedsim_peak_rss_mb": round(best["fedsim"]["peak_rss_mb"], 1),
            "gossip_handwritten_peak_rss_mb": round(best["handwritten"]["peak_rss_mb"], 1)}


def dadao_events(nodes: int, units: int, radius: float, trials: int) -> dict[str, float]:
    """fedsim's DADAO against the hand-written one over the same events; prints seconds per 10^6 events, the
    ratio, peak memory and how far apart their final network averages are, and returns the figures."""
    mapping = dadao_scenario(nodes, units, radius)
    workers = ("fedsim_dadao", "handwritten_dadao")
    runs = [{name: measure(name, mapping) for name in workers} for _ in range(trials)]
    best = {name: min((r[name] for r in runs), key=lambda r: r["seconds"] / r["events"]) for name in workers}
    fedsim, hand = best["fedsim_dadao"], best["handwritten_dadao"]
    assert fedsim["events"] == hand["events"], "both ran the same events"
    per_million = {name: r["seconds"] / r["events"] * 1e6 for name, r in best.items()}
    ratio = per_million["fedsim_dadao"] / per_million["handwritten_dadao"]
    a, h = fedsim["average"], hand["average"]
    difference = max(abs(x - y) for x, y in zip(a, h, strict=True)) / max(abs(y) for y in h)
    print(f"dadao: {nodes:,} nodes, random geometric graph (radius {radius}), ridge regression (d {FEATURES}, "
          f"full-batch gradients), {units} units of time: {fedsim['total_events']:,} events "
          f"({fedsim['gradient_events']:,} gradient, lambda_mix {fedsim['rate_mix']:.0f})")
    for name, r in best.items():
        print(f"  {name.removesuffix('_dadao'):12s} {per_million[name]:8.1f} s per 10^6 events "
              f"({r['events']:,} events after the first unit in {r['seconds']:.1f} s), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB ({r['rss_before_mb']:.0f} MB when the events start)")
    print(f"  fedsim / handwritten: {ratio:.2f}; final network averages differ by {difference:.1e} (relative)")
    return {"dadao_nodes": nodes, "dadao_events": fedsim["total_events"],
            "dadao_fedsim_s_per_million_events": round(per_million["fedsim_dadao"], 3),
            "dadao_handwritten_s_per_million_events": round(per_million["handwritten_dadao"], 3),
            "dadao_fedsim_over_handwritten": round(ratio, 3),
            "dadao_fedsim_peak_rss_mb": round(fedsim["peak_rss_mb"], 1),
            "dadao_handwritten_peak_rss_mb": round(hand["peak_rss_mb"], 1),
            "dadao_average_relative_difference": float(f"{difference:.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small versions (seconds), one trial each")
    parser.add_argument("--measure", choices=("all", "gossip", "dadao"), default="all", help="which to run")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "SCENARIO", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, mapping, report = args.worker
        Path(report).write_text(json.dumps(WORKERS[name](json.loads(mapping))))
        return
    figures: dict[str, float] = {}
    if args.measure in ("all", "gossip"):
        figures |= gossip_round(1000, 6, 0.08, 1) if args.quick else gossip_round(10_000, 12, 0.03, 2)
    if args.measure in ("all", "dadao"):
        figures |= dadao_events(200, 4, 0.2, 1) if args.quick else dadao_events(1000, 60, 0.08, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

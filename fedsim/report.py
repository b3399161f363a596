"""The result table a run prints, and the pictures it writes: accuracy and loss against rounds, simulated time and
client updates (plot.png); client jobs on the virtual clock (timeline.png); staleness, participation and idle
time (async.png); a decentralized run's graph with its nodes coloured by their own model's score or the walk's visit
frequency (topology.png)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.outputs import write_atomic
from fedsim.recording import OUTCOMES, run_variant
from fedsim.timeline import (
    Log,
    Target,
    idle_fractions,
    participation_counts,
    run_end,
    staleness_histogram,
    target_of,
    time_to_target,
    timeline_window,
)

Row = dict[str, Any]
MAX_LANES = 40
"""Clients timeline.png shows at most (those whose first job starts earliest)."""
MAX_PANELS = 4
"""Variants timeline.png shows at most (the first ones with jobs)."""
SHADES = {"used": ("#c6dbef", "#6baed6", "#08519c"), "stale": ("#fdd0a2", "#fd8d3c", "#a63603"),
          "dropped": ("#d9d9d9", "#969696", "#404040"), "unfinished": ("#dadaeb", "#9e9ac8", "#54278f")}
"""Download, train and upload colours of a job, by outcome."""


def final_rows(rows: Sequence[Row]) -> list[Row]:
    """The last row of each variant, with its best accuracy added (for tasks that report accuracy), in first-seen
    variant order."""
    last: dict[str, Row] = {}
    best: dict[str, float] = {}
    for r in rows:
        last[r["variant"]] = r
        if "accuracy" in r:
            best[r["variant"]] = max(best.get(r["variant"], float("-inf")), r["accuracy"])
    return [{**row, "best_accuracy": best[v]} if v in best else dict(row) for v, row in last.items()]


def _figure(row: Row, key: str) -> str:
    return f"{row[key]:.4f}" if key in row else "-"


def _time_to(rows: Sequence[Row], variant: str, target: Target | None) -> str:
    if target is None:
        return "-"
    seconds = time_to_target([r for r in rows if r["variant"] == variant], target)["sim_time"]
    return "-" if seconds is None else f"{seconds:.1f}"


def format_table(rows: Sequence[Row], targets: Mapping[str, Target | None] | None = None) -> str:
    """A plain-text table: one line per variant with its final metrics, simulated and real time, and traffic (and
    the personal models' accuracy pooled over their test samples, as the global accuracy is, when the algorithm
    keeps them; the simulated seconds to each variant's target in `targets`, "-" where never reached)."""
    personal = any("personal_accuracy_pooled" in r for r in rows)
    targets = {v: t for v, t in (targets or {}).items() if t is not None}
    headers = ["variant", "round", "accuracy", "best acc", *(["personal acc"] if personal else []), "train loss",
               "sim time (s)", *(["time to target (s)"] if targets else []), "wall (s)", "MB up", "MB down"]
    lines = [[r["variant"], str(r["round"]), _figure(r, "accuracy"), _figure(r, "best_accuracy"),
              *([_figure(r, "personal_accuracy_pooled")] if personal else []),
              f"{r['loss']:.4f}", f"{r['sim_time']:.1f}",
              *([_time_to(rows, r["variant"], targets.get(run_variant(r["variant"])))] if targets else []),
              f"{r['wall_time']:.1f}",
              f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}"] for r in final_rows(rows)]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Write `fig` as a PNG atomically and free it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    write_atomic(path, buf.getvalue())


def write_plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Accuracy and training loss against rounds (top), simulated seconds, client updates (when every row counts
    them) and epsilon (when every row of a private run reports it: the first accountant's, at the rows' delta), one
    line per variant; with personal models, their accuracy (pooled over the scored
    clients' test samples, as the global model's) dashed next to the global model's and, in a third column, the
    distribution of per-client personal accuracy at each variant's last evaluation."""
    plt = _pyplot()
    personal = any("personal_accuracy_histogram" in r for r in rows)
    x_axes = [("round", "round"), ("sim_time", "simulated time (s)")]
    if all("client_updates" in r for r in rows):
        x_axes.append(("client_updates", "client updates"))
    epsilon = next((k for k in rows[0] if k.startswith("epsilon_")), None) if rows else None
    if epsilon is not None and all(math.isfinite(r.get(epsilon, math.inf)) for r in rows):
        x_axes.append((epsilon, f"epsilon ({epsilon.removeprefix('epsilon_')}, delta {rows[0]['delta']:g})"))
    fig, axes = plt.subplots(len(x_axes), 3 if personal else 2, figsize=(16 if personal else 11, 3.75 * len(x_axes)),
                             squeeze=False)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    first = ("accuracy", "test accuracy") if all("accuracy" in r for r in rows) else ("test_loss", "test loss")
    for v in variants:
        vr = [r for r in rows if r["variant"] == v]
        for row_i, (x_key, _) in enumerate(x_axes):
            for col_i, y_key in enumerate([first[0], "loss"]):
                line, = axes[row_i][col_i].plot([r[x_key] for r in vr], [r[y_key] for r in vr], label=v)
            scored = [r for r in vr if "personal_accuracy_pooled" in r]
            if scored:
                axes[row_i][0].plot([r[x_key] for r in scored], [r["personal_accuracy_pooled"] for r in scored], "--",
                                    color=line.get_color(), label=f"{v} (personal)" if row_i == 0 else None)
    for row_i, (_, x_label) in enumerate(x_axes):
        for col_i, y_label in enumerate([first[1], "training loss"]):
            ax = axes[row_i][col_i]
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    if personal:
        _personal_histograms(axes[0][2], rows, variants)
        for row_i in range(1, len(x_axes)):
            axes[row_i][2].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _personal_histograms(ax: Any, rows: Sequence[Row], variants: list[str]) -> None:
    """Per-client personal accuracy at each variant's last evaluation that scored any, as side-by-side bars."""
    last = {r["variant"]: r["personal_accuracy_histogram"] for r in rows if "personal_accuracy_histogram" in r}
    shown = [v for v in variants if v in last]
    bins = len(next(iter(last.values())))
    width = 1.0 / bins / max(1, len(shown))
    for i, v in enumerate(shown):
        ax.bar([b / bins + i * width for b in range(bins)], last[v], width=width, align="edge", label=v)
    ax.set_xlabel("personal test accuracy (per client, last evaluation)")
    ax.set_ylabel("clients")
    ax.set_xlim(0, 1)
    ax.legend()


def write_pictures(directory: Path, rows: Sequence[Row], scenarios: Sequence[Any],
                   timelines: Mapping[str, Log | None]) -> None:
    """plot.png when any variant asks for pictures (`output.plot`); timeline.png and async.png for the variants
    that ask and logged jobs (gossip protocols log none: without such a variant neither file is written)."""
    plotted = [s for s in scenarios if s.spec.output.plot]
    if not plotted:
        return
    write_plot(rows, directory / "plot.png", scenarios[0].spec.name)
    jobs = []
    for s in plotted:
        log = timelines.get(s.variant)
        if log is not None and log["job"].size:
            end = run_end([r for r in rows if run_variant(r["variant"]) == s.variant], log)
            jobs.append((s.variant, log, end, s.spec))
    maps = [(s.variant, timelines[s.variant]) for s in plotted
            if timelines.get(s.variant) is not None and "map_edges" in timelines[s.variant]]
    if maps:
        write_topology_plot(maps[:MAX_PANELS], directory / "topology.png")
    if jobs:
        write_timeline_plot([(v, log, timeline_window(log, end, spec.output.timeline_seconds))
                             for v, log, end, spec in jobs[:MAX_PANELS]], directory / "timeline.png")
        write_async_plot([(v, log, spec.num_clients, end) for v, log, end, spec in jobs], directory / "async.png")


MAP_LABELS = {"accuracy": "accuracy of the node's model on its test split",
              "test_loss": "test loss of the node's model on its test split", "visits": "visit frequency"}
"""Colour-bar label of each per-node figure a node map may carry."""
LAYOUT_NODES = 2000
"""Largest graph drawn with a force-directed layout; larger ones go on a circle."""


def write_topology_plot(panels: Sequence[tuple[str, Log]], path: Path) -> None:
    """One panel per (variant, log with a node map): the graph's edges in grey and its nodes coloured by the map's
    per-node figure (the first of MAP_LABELS it has), laid out by a seeded spring layout."""
    plt = _pyplot()
    import networkx as nx
    from matplotlib.collections import LineCollection

    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.2 * len(panels), 4.6))
    for ax, (variant, log) in zip(axes[0], panels, strict=True):
        name = next(k for k in MAP_LABELS if f"map_{k}" in log)
        values = log[f"map_{name}"]
        graph = nx.Graph()
        graph.add_nodes_from(range(len(values)))
        graph.add_edges_from(map(tuple, log["map_edges"].tolist()))
        layout = nx.spring_layout(graph, seed=0) if len(values) <= LAYOUT_NODES else nx.circular_layout(graph)
        xy = np.array([layout[i] for i in range(len(values))])
        ax.add_collection(LineCollection(xy[log["map_edges"]], colors="#bdbdbd", linewidths=0.6, zorder=1))
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap="viridis", s=max(6, 400 / np.sqrt(len(values))),
                          zorder=2, edgecolors="k", linewidths=0.3)
        fig.colorbar(dots, ax=ax, label=MAP_LABELS[name], shrink=0.8)
        ax.set_title(f"{variant}: {len(values)} nodes, {len(log['map_edges'])} edges", fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path)


def targets_of(scenarios: Sequence[Any]) -> dict[str, Target | None]:
    """Each variant's target (`evaluation.target` / `target_loss`), for the table's time-to-target column."""
    return {s.variant: target_of(s.spec.evaluation) for s in scenarios}


def write_timeline_plot(panels: Sequence[tuple[str, Log, float]], path: Path) -> None:
    """A Gantt chart per (variant, log, seconds): the first `seconds` of simulated time, one lane per client (the
    `MAX_LANES` whose first job starts earliest), each job as download, train and upload bars in three shades (blue
    used, orange refused as stale with an x where it arrived, grey dropped with a v), server steps as vertical lines."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lanes = [_lanes(log, seconds) for _, log, seconds in panels]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(11, sum(1.6 + 0.2 * len(c) for c in lanes)),
                             gridspec_kw={"height_ratios": [1.6 + 0.2 * len(c) for c in lanes]})
    for ax, (variant, log, seconds), clients in zip(axes[:, 0], panels, lanes, strict=True):
        by_id = np.argsort(clients)
        shown = np.isin(log["client"], clients) & (log["start"] < seconds)
        lane = by_id[np.searchsorted(np.asarray(clients)[by_id], log["client"][shown])].astype(np.float64)
        bounds = [log[k][shown] for k in ("start", "downloaded", "trained", "end")]
        outcome = log["outcome"][shown]
        for o, name in enumerate(OUTCOMES):
            mine = outcome == o
            for phase in range(3):
                left = np.minimum(bounds[phase][mine], seconds)
                ax.barh(lane[mine], np.minimum(bounds[phase + 1][mine], seconds) - left, left=left, height=0.7,
                        color=SHADES[name][phase], linewidth=0)
            if name in ("stale", "dropped"):
                ends = bounds[3][mine]
                ax.scatter(ends[ends <= seconds], lane[mine][ends <= seconds], marker="x" if name == "stale" else "v",
                           color="#a50f15" if name == "stale" else "black", s=18, zorder=3)
        steps = log["server_steps"][log["server_steps"] <= seconds]
        ax.vlines(steps, -0.5, len(clients) - 0.5, colors="black", alpha=0.35, linewidth=0.7)
        ax.set_yticks(range(len(clients)), [str(c) for c in clients], fontsize=6 if len(clients) > 20 else 8)
        ax.set_ylim(len(clients) - 0.5, -0.5)
        ax.set_xlim(0, seconds)
        ax.set_ylabel("client")
        ax.set_xlabel("simulated time (s)")
        total = np.unique(log["client"]).size
        ax.set_title(f"{variant}: the first {seconds:.4g} s, {len(clients)} of {total} clients with jobs, "
                     f"{steps.size} server steps", fontsize=10)
    handles = [Patch(color=SHADES["used"][i], label=label) for i, label in enumerate(["download", "train", "upload"])]
    handles += [Patch(color=SHADES["stale"][1], label="refused (stale)"),
                Patch(color=SHADES["dropped"][1], label="dropped"),
                Patch(color=SHADES["unfinished"][1], label="unfinished at the end"),
                Line2D([], [], color="black", alpha=0.35, label="server step")]
    axes[0][0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _lanes(log: Log, seconds: float) -> list[int]:
    """The clients given a lane: those with a job starting before `seconds`, earliest first job first (ties by
    client id), at most `MAX_LANES`."""
    early = np.flatnonzero(log["start"] < seconds)
    early = early[np.argsort(log["start"][early], kind="stable")]
    clients, first = np.unique(log["client"][early].astype(np.int64), return_index=True)
    starts = log["start"][early][first]
    return clients[np.lexsort((clients, starts))][:MAX_LANES].tolist()


def write_async_plot(variants: Sequence[tuple[str, Log, int, float]], path: Path) -> None:
    """Per (variant, log, num_clients, run end): the staleness histogram of used jobs, the distribution of used jobs
    per client (all clients, never-used ones at 0) and of client idle fraction (clients with jobs)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(variants)
    for i, (variant, log, num_clients, end) in enumerate(variants):
        used, refused, dropped, _ = (int((log["outcome"] == OUTCOMES.index(o)).sum()) for o in OUTCOMES)
        label = f"{variant} ({used} used, {refused} refused, {dropped} dropped)"
        stale = staleness_histogram(log)
        axes[0].bar(np.arange(stale.size) - 0.4 + i * width, stale, width=width, align="edge", label=label)
        counts = participation_counts(log, num_clients)
        axes[1].hist(counts, bins=np.arange(counts.max() + 2) - 0.5, histtype="step", linewidth=1.5, label=variant)
        axes[2].hist(idle_fractions(log, end)[1], bins=np.linspace(0, 1, 21), histtype="step", linewidth=1.5,
                     label=variant)
    for ax, x_label, y_label in zip(axes, ["staleness (server versions since download)", "used jobs per client",
                                           "client idle fraction"], ["used jobs", "clients", "clients"], strict=True):
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)

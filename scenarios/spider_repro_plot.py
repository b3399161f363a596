"""Gradient norm against epsilon for private SpiderBoost and DP-SGD (scenarios/spider_repro.yaml), mean and min-max
over seeds 0-2: draws scenarios/spider_repro.png and prints the README's table. About 3.5 minutes on 2 CPU cores.

    python scenarios/spider_repro_plot.py [--seeds 0 1 2] [--out scenarios/spider_repro.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import fedsim

ROOT = Path(__file__).parent.parent
SCENARIO = ROOT / "scenarios" / "spider_repro.yaml"
METHODS = {"spider": ("private SpiderBoost", "tab:orange"), "dpsgd": ("DP-SGD", "tab:blue")}
"""Variant prefix: its label and colour."""
PLAIN = "nonprivate_gd"
STATISTICS = {"mean": "mean grad norm over the iterates (random output)", "final": "final grad norm"}


def summaries(seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Per variant, per seed (in seed order): the mean and the final grad_norm over its evaluated iterates and the
    epsilon it spent."""
    out: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        rows = fedsim.run(SCENARIO, overrides={"seed": seed}, write=False).metrics.rows
        by_variant: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_variant.setdefault(row["variant"], []).append(row)
        for variant, runs in by_variant.items():
            norms = [r["grad_norm"] for r in runs]
            out.setdefault(variant, []).append({"mean": float(np.mean(norms)), "final": norms[-1],
                                                "initial": norms[0], "epsilon": runs[-1].get("epsilon_rdp")})
    return out


def curve(runs: dict[str, list[dict[str, Any]]], method: str, statistic: str) -> tuple[np.ndarray, np.ndarray]:
    """A method's spent epsilon (mean over seeds) per variant, and the statistic (variants x seeds), by epsilon."""
    names = [v for v in runs if v.startswith(f"{method}_eps")]
    eps = np.array([np.mean([r["epsilon"] for r in runs[v]]) for v in names])
    values = np.array([[r[statistic] for r in runs[v]] for v in names])
    order = np.argsort(eps)
    return eps[order], values[order]


def spread(values: np.ndarray) -> str:
    """`mean [min, max]` over seeds."""
    return f"{values.mean():.3f} [{values.min():.3f}, {values.max():.3f}]"


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """The README's markdown table: per epsilon, each method's mean and final grad norm, mean [min, max] over seeds."""
    columns = [(m, s) for m in METHODS for s in STATISTICS]
    lines = ["| epsilon (delta 1e-5) | " + " | ".join(f"{METHODS[m][0]}: {s}" for m, s in columns) + " |",
             "|---|" + "---|" * len(columns)]
    curves = {(m, s): curve(runs, m, s) for m, s in columns}
    for i, eps in enumerate(curves[columns[0]][0]):
        lines.append(f"| {eps:.2g} | " + " | ".join(spread(curves[c][1][i]) for c in columns) + " |")
    plain = [spread(np.array([r[s] for r in runs[PLAIN]])) for _, s in columns]
    return "\n".join([*lines, "| no privacy (GD) | " + " | ".join(plain) + " |"])


def plot(runs: dict[str, list[dict[str, Any]]], seeds: list[int], path: Path) -> None:
    """Two panels (mean over iterates, final): one line per method (mean, min-max band) against epsilon, log-log;
    gradient descent's level dashed, the initial iterate's dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, (statistic, title) in zip(axes, STATISTICS.items(), strict=True):
        for method, (label, colour) in METHODS.items():
            eps, values = curve(runs, method, statistic)
            ax.plot(eps, values.mean(1), "o-", color=colour, label=label)
            ax.fill_between(eps, values.min(1), values.max(1), color=colour, alpha=0.2)
        level = np.mean([r[statistic] for r in runs[PLAIN]])
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label="no privacy (GD)")
        start = np.mean([r["initial"] for r in runs[PLAIN]])
        ax.axhline(start, color="black", linestyle=":", linewidth=1, label="initial iterate")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(eps, [f"{e:.2g}" for e in eps])
        ax.set_xlabel("epsilon spent (RDP accountant, delta 1e-5)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("||grad F(w)|| (training loss)")
    axes[0].legend(fontsize=8, loc="lower left")
    ticks = [0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
    for ax in axes:
        ax.minorticks_off()
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    fig.suptitle(f"digits, MLP 64-16-10 tanh, 100 steps (mean, min-max over seeds {seeds[0]}-{seeds[-1]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run every variant on each seed, print the table and draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=SCENARIO.with_suffix(".png"))
    args = parser.parse_args()
    runs = summaries(args.seeds)
    print(table(runs))
    for variant, per_seed in runs.items():
        print(variant, " ".join(f"{r['mean']:.3f}/{r['final']:.3f}" for r in per_seed))
    plot(runs, args.seeds, args.out)


if __name__ == "__main__":
    main()

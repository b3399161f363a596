"""Final test accuracy against epsilon for DP-SGD and DP-FedAvg (scenarios/dp_repro.yaml), mean and min-max over
seeds 0-2: draws scenarios/dp_repro.png and prints the README's table. About 1.5 minutes on 2 CPU cores.

    python scenarios/dp_repro_plot.py [--seeds 0 1 2] [--out scenarios/dp_repro.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import fedsim

ROOT = Path(__file__).parent.parent
SCENARIO = ROOT / "scenarios" / "dp_repro.yaml"
MECHANISMS = {"dpsgd": ("DP-SGD, sample-level (10 clients)", "nonprivate_silos", "tab:blue"),
              "dpfedavg": ("DP-FedAvg, user-level (500 clients)", "nonprivate_users", "tab:orange")}
"""Mechanism: its label, its non-private counterpart (the same clients and training without privacy), its colour."""


def final_rows(seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Each variant's last metrics row on each seed, in seed order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        rows = fedsim.run(SCENARIO, overrides={"seed": seed}, write=False).metrics.rows
        for variant, row in {r["variant"]: r for r in rows}.items():
            out.setdefault(variant, []).append(row)
    return out


def curve(finals: dict[str, list[dict[str, Any]]], mechanism: str) -> tuple[np.ndarray, np.ndarray]:
    """A mechanism's spent epsilon (mean over seeds) per variant, and its accuracies (variants x seeds), by epsilon."""
    names = [v for v in finals if v.startswith(f"{mechanism}_eps")]
    eps = np.array([np.mean([r["epsilon_rdp"] for r in finals[v]]) for v in names])
    acc = np.array([[r["accuracy"] for r in finals[v]] for v in names])
    order = np.argsort(eps)
    return eps[order], acc[order]


def spread(acc: np.ndarray) -> str:
    """`mean [min, max]` of one variant's accuracies over seeds."""
    return f"{acc.mean():.3f} [{acc.min():.3f}, {acc.max():.3f}]"


def table(finals: dict[str, list[dict[str, Any]]]) -> str:
    """The README's markdown table: final test accuracy per epsilon and mechanism, mean [min, max] over seeds."""
    curves = {m: curve(finals, m) for m in MECHANISMS}
    lines = ["| epsilon (delta 1e-5) | " + " | ".join(label for label, _, _ in MECHANISMS.values()) + " |",
             "|---|" + "---|" * len(MECHANISMS)]
    for i, eps in enumerate(curves["dpsgd"][0]):
        lines.append(f"| {eps:.2g} | " + " | ".join(spread(curves[m][1][i]) for m in MECHANISMS) + " |")
    baseline = [spread(np.array([r["accuracy"] for r in finals[plain]])) for _, plain, _ in MECHANISMS.values()]
    return "\n".join([*lines, "| non-private | " + " | ".join(baseline) + " |"])


def plot(finals: dict[str, list[dict[str, Any]]], seeds: list[int], path: Path) -> None:
    """One line per mechanism (mean, min-max band) against epsilon, its non-private level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mechanism, (label, plain, colour) in MECHANISMS.items():
        eps, acc = curve(finals, mechanism)
        ax.plot(eps, acc.mean(1), "o-", color=colour, label=label)
        ax.fill_between(eps, acc.min(1), acc.max(1), color=colour, alpha=0.2)
        level = np.mean([r["accuracy"] for r in finals[plain]])
        ax.axhline(level, color=colour, linestyle="--", linewidth=1, label=f"{plain}: no privacy")
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:.2g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("epsilon spent (RDP accountant, delta 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"digits, logistic regression (mean, min-max over seeds {seeds[0]}-{seeds[-1]})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run every variant on each seed, print the table and draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=SCENARIO.with_suffix(".png"))
    args = parser.parse_args()
    finals = final_rows(args.seeds)
    print(table(finals))
    plot(finals, args.seeds, args.out)


if __name__ == "__main__":
    main()

"""The result table a run prints, and the plot it writes: accuracy and loss against rounds and simulated time."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.outputs import write_atomic

Row = dict[str, Any]


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


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: one line per variant with its final metrics, simulated and real time, and traffic (and
    the personal models' accuracy pooled over their test samples, as the global accuracy is, when the algorithm
    keeps them)."""
    personal = any("personal_accuracy_pooled" in r for r in rows)
    headers = ["variant", "round", "accuracy", "best acc", *(["personal acc"] if personal else []), "train loss",
               "sim time (s)", "wall (s)", "MB up", "MB down"]
    lines = [[r["variant"], str(r["round"]), _figure(r, "accuracy"), _figure(r, "best_accuracy"),
              *([_figure(r, "personal_accuracy_pooled")] if personal else []),
              f"{r['loss']:.4f}", f"{r['sim_time']:.1f}", f"{r['wall_time']:.1f}",
              f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}"] for r in final_rows(rows)]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def write_plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Accuracy and training loss against rounds (top) and simulated seconds (bottom), one line per variant; with
    personal models, their accuracy (pooled over the scored clients' test samples, as the global model's) dashed next
    to the global model's and, in a third column, the
    distribution of per-client personal accuracy at each variant's last evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    personal = any("personal_accuracy_histogram" in r for r in rows)
    fig, axes = plt.subplots(2, 3 if personal else 2, figsize=(16 if personal else 11, 7.5), squeeze=False)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    first = ("accuracy", "test accuracy") if all("accuracy" in r for r in rows) else ("test_loss", "test loss")
    for v in variants:
        vr = [r for r in rows if r["variant"] == v]
        for row_i, x_key in enumerate(["round", "sim_time"]):
            for col_i, y_key in enumerate([first[0], "loss"]):
                line, = axes[row_i][col_i].plot([r[x_key] for r in vr], [r[y_key] for r in vr], label=v)
            scored = [r for r in vr if "personal_accuracy_pooled" in r]
            if scored:
                axes[row_i][0].plot([r[x_key] for r in scored], [r["personal_accuracy_pooled"] for r in scored], "--",
                                    color=line.get_color(), label=f"{v} (personal)" if row_i == 0 else None)
    for row_i, x_label in enumerate(["round", "simulated time (s)"]):
        for col_i, y_label in enumerate([first[1], "training loss"]):
            ax = axes[row_i][col_i]
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    if personal:
        _personal_histograms(axes[0][2], rows, variants)
        axes[1][2].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


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

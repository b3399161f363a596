"""A tqdm progress bar over rounds, shown only on a terminal and not with --quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm

from fedsim.recording import Progress, Row


class RoundBar(Progress):
    def __init__(self, label: str, rounds: int | None) -> None:
        self.bar = tqdm(total=rounds, desc=label, unit="round", file=sys.stderr, leave=True)

    def advance(self, round_index: int, row: Row | None) -> None:
        if row is not None:
            shown = {"acc": row.get("accuracy"), "loss": row["loss"]}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def make_progress(enabled: bool, label: str, rounds: int | None) -> Progress:
    """A bar when enabled and stderr is a terminal; otherwise the silent default."""
    return RoundBar(label, rounds) if enabled and sys.stderr.isatty() else Progress()

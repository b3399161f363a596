"""A small column-oriented view over metrics rows, so `result.metrics` reads like a table without pandas."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fedsim.report import format_table

Row = dict[str, Any]


class MetricsTable:
    """Rows of metrics (one per evaluation and variant) with column access and filtering."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.rows for k in r))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __getitem__(self, column: str) -> list[Any]:
        return [r.get(column) for r in self.rows]

    def where(self, **equal: Any) -> MetricsTable:
        """The rows whose columns equal the given values, e.g. `where(variant="fedprox_mu1")`."""
        return MetricsTable([r for r in self.rows if all(r.get(k) == v for k, v in equal.items())])

    def last(self) -> Row:
        return self.rows[-1]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows)

    def __repr__(self) -> str:
        return format_table(self.rows) if self.rows else "MetricsTable(empty)"

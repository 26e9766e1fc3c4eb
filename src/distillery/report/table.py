"""The comparison table of the main job, as plain text for the terminal and markdown for a file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass
class ModelRow:
    role: str
    model: str
    test_accuracy: float
    parameters: int
    size_bytes: int
    latency_ms_b1: float
    throughput_b256: float

    def as_dict(self) -> dict:
        return asdict(self)


HEADERS = ("model", "network", "test acc", "params", "size", "latency b=1", "throughput b=256")


def _cells(row: ModelRow) -> list[str]:
    return [
        row.role,
        row.model,
        f"{100 * row.test_accuracy:.2f} %",
        f"{row.parameters:,}",
        human_bytes(row.size_bytes),
        f"{row.latency_ms_b1:.3f} ms",
        f"{row.throughput_b256:,.0f} img/s",
    ]


def human_bytes(n: int) -> str:
    """Decimal units: 999 B, 1.0 KB, 2.5 MB (1 KB = 1000 B)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def render_markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of already formatted cells."""
    _check_widths(headers, rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_text(headers: Sequence[str], rows: Sequence[Sequence[str]], left_columns: int = 2) -> str:
    """A plain-text table for the terminal: the first ``left_columns`` columns left-aligned, the rest right."""
    _check_widths(headers, rows)
    cells = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    out = []
    for k, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i < left_columns else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def _check_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"table row {i} has {len(row)} cells for {len(headers)} columns")


def markdown_table(rows: Sequence[ModelRow]) -> str:
    return render_markdown(HEADERS, [_cells(r) for r in rows])


def text_table(rows: Sequence[ModelRow]) -> str:
    return render_text(HEADERS, [_cells(r) for r in rows])

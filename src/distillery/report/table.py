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
        _human_bytes(row.size_bytes),
        f"{row.latency_ms_b1:.3f} ms",
        f"{row.throughput_b256:,.0f} img/s",
    ]


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def markdown_table(rows: Sequence[ModelRow]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[ModelRow]) -> str:
    cells = [list(HEADERS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    out = []
    for k, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"

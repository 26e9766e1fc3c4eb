"""Reporting: measurements, tables and plots."""

from distillery.report.measure import (
    Timing,
    count_parameters,
    size_on_disk,
    time_calls,
    time_model,
    torch_threads,
)
from distillery.report.plots import plot_forest, plot_learning_curves, save_figure
from distillery.report.table import ModelRow, human_bytes, markdown_table, render_markdown, render_text, text_table

__all__ = ["ModelRow", "Timing", "count_parameters", "human_bytes", "markdown_table", "plot_forest",
           "plot_learning_curves", "render_markdown", "render_text", "save_figure", "size_on_disk", "text_table",
           "time_calls", "time_model", "torch_threads"]

"""Reporting: measurements, tables and plots."""

from distillery.report.measure import count_parameters, latency_ms, size_on_disk, throughput
from distillery.report.plots import plot_learning_curves
from distillery.report.table import ModelRow, markdown_table, text_table

__all__ = ["ModelRow", "count_parameters", "latency_ms", "markdown_table", "plot_learning_curves",
           "size_on_disk", "text_table", "throughput"]

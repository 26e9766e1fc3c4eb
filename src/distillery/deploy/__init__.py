"""Deploying a student: verified exports, int8 quantisation, measurements and the compression card."""

from distillery.deploy.card import Card, CardInput, CardRow, build_card, plot_accuracy_latency
from distillery.deploy.export import (
    FORMATS,
    ExportMismatchError,
    ExportResult,
    export_model,
    read_safetensors_metadata,
    verify_export,
)
from distillery.deploy.measure import (
    Speed,
    SpeedSettings,
    mean_kl,
    model_logits,
    onnx_accuracy,
    onnx_speed,
    top1_accuracy,
    top1_agreement,
    torch_speed,
)
from distillery.deploy.quantize import QuantizeResult, quantize_onnx
from distillery.deploy.runtime import onnx_logits, onnx_session

__all__ = [
    "FORMATS", "Card", "CardInput", "CardRow", "ExportMismatchError", "ExportResult", "QuantizeResult", "Speed",
    "SpeedSettings", "build_card", "export_model", "mean_kl", "model_logits", "onnx_accuracy", "onnx_logits",
    "onnx_session", "onnx_speed", "plot_accuracy_latency", "quantize_onnx", "read_safetensors_metadata",
    "top1_accuracy", "top1_agreement", "torch_speed", "verify_export",
]

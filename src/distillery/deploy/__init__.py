"""Deploying a student: verified exports, int8 quantisation, measurements and the compression card."""

from distillery.deploy.export import (
    FORMATS,
    ExportMismatchError,
    ExportResult,
    export_model,
    read_safetensors_metadata,
    verify_export,
)
from distillery.deploy.measure import Speed, SpeedSettings, mean_kl, onnx_speed, top1_agreement, torch_speed
from distillery.deploy.quantize import QuantizeResult, quantize_onnx
from distillery.deploy.runtime import onnx_accuracy, onnx_logits, onnx_session

__all__ = ["FORMATS", "ExportMismatchError", "ExportResult", "QuantizeResult", "Speed", "SpeedSettings",
           "export_model", "mean_kl", "onnx_accuracy", "onnx_logits", "onnx_session", "onnx_speed",
           "quantize_onnx", "read_safetensors_metadata", "top1_agreement", "torch_speed", "verify_export"]

"""Deploying a student: verified exports, int8 quantisation, measurements and the compression card."""

from distillery.deploy.export import (
    FORMATS,
    ExportMismatchError,
    ExportResult,
    export_model,
    read_safetensors_metadata,
    verify_export,
)
from distillery.deploy.runtime import onnx_accuracy, onnx_logits, onnx_session

__all__ = ["FORMATS", "ExportMismatchError", "ExportResult", "export_model", "onnx_accuracy", "onnx_logits",
           "onnx_session", "read_safetensors_metadata", "verify_export"]

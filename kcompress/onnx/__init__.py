"""ONNX Runtime as a second runtime: export Keras models to ONNX (checked against Keras), run ``.onnx`` files,
quantize them with ONNX Runtime's tools. Every module imports onnx/onnxruntime/tf2onnx inside its functions."""

from kcompress.onnx.export import export_onnx, onnx_bytes
from kcompress.onnx.quantize import quantize_onnx
from kcompress.onnx.runtime import ONNXModel, is_onnx

__all__ = ["export_onnx", "onnx_bytes", "quantize_onnx", "ONNXModel", "is_onnx"]

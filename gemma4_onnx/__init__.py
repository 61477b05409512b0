"""gemma4-onnx: Gemma 4 → ONNX export, per-layer quantization and parity with the PyTorch source.

The package is one import root over four folders: ``gemma4_onnx.exporter`` (torch side),
``gemma4_onnx.graphs`` (ONNX side), ``gemma4_onnx.quantize`` and ``gemma4_onnx.runtime``
(onnxruntime side, no torch).
"""

__version__ = "0.1.0"

"""Torch side: variant registry, checkpoints, block wrappers and the export driver."""

if __name__ != "gemma4_onnx.exporter":  # one name per module, also where the repo root is on sys.path
    raise ImportError("import gemma4_onnx.exporter, not exporter")

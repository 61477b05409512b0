"""onnxruntime side (no torch): sessions, generation, parity harness, reports, packaging."""

if __name__ != "gemma4_onnx.runtime":  # one name per module, also where the repo root is on sys.path
    raise ImportError("import gemma4_onnx.runtime, not runtime")

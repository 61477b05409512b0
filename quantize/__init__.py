"""Per-layer quantization: recipes as data, plans, applying them to a package."""

if __name__ != "gemma4_onnx.quantize":  # one name per module, also where the repo root is on sys.path
    raise ImportError("import gemma4_onnx.quantize, not quantize")

"""Mobile deployment (no torch): ORT-format packages, reduced-operator builds, PLE rows gathered from storage."""

if __name__ != "gemma4_onnx.mobile":  # one name per module, also where the repo root is on sys.path
    raise ImportError("import gemma4_onnx.mobile, not mobile")

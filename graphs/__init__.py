"""ONNX side: the ai.gemma4 custom-op functions, graph passes and I/O contracts."""

if __name__ != "gemma4_onnx.graphs":  # one name per module, also where the repo root is on sys.path
    raise ImportError("import gemma4_onnx.graphs, not graphs")

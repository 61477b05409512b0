"""One exported decoder layer (``blocks/layer_NN.onnx``) run alone, for per-block parity and bisection."""

from pathlib import Path

import numpy as np

from gemma4_onnx.runtime.checked_session import checked_session
from gemma4_onnx.runtime.text_model import session_options


def run_block(directory: Path, manifest: dict, layer: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    entry = next(b for b in manifest["graphs"]["blocks"] if b["layer"] == layer)
    session = checked_session(Path(directory), manifest, entry["file"], session_options())
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True))

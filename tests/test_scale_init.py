"""Full-size random checkpoints stream: a 10 GB E2B is written with a small, flat memory footprint."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_onnx.exporter.checkpoint import Checkpoint

PEAK_RSS_LIMIT = 2 << 30  # the foundation issue's bound for writing a full-size e2b


@pytest.mark.slow
def test_full_size_e2b_checkpoint_is_written_under_2_gb_peak_rss(tmp_path: Path) -> None:
    out = tmp_path / "e2b"
    code = ("import sys; from gemma4_onnx.cli import main; "
            f"sys.exit(main(['init-checkpoint', 'e2b', '{out}', '--quiet']))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=3600)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"full-size e2b init-checkpoint peak RSS: {peak / 2**20:.0f} MiB")
    assert peak < PEAK_RSS_LIMIT
    checkpoint = Checkpoint.open(out)
    assert checkpoint.nbytes() > 10e9

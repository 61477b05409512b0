"""Run one command and write its wall seconds and peak RSS as JSON: ``measured_run.py REPORT COMMAND...``.

Linux carries a process's peak RSS across ``exec``, so a command spawned straight from the benchmark
process reports at least the benchmark's own RSS (4.5 GB once the full-size sections have run, which is
what every step of one run reported). Forked from this small process instead, as ``/usr/bin/time``
does, the command's peak is its own. SIGTERM is passed on to the command (an export stops at a block
boundary and keeps what it can resume from); SIGINT from a terminal reaches the command by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    report, command = Path(sys.argv[1]), sys.argv[2:]
    start = time.monotonic()
    child = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
    signal.signal(signal.SIGINT, lambda *_: None)
    _, status, usage = os.wait4(child.pid, 0)
    report.write_text(json.dumps({"seconds": time.monotonic() - start, "peak_rss_bytes": usage.ru_maxrss * 1024}))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())

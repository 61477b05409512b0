"""glibc's allocator set for export and quantization, whose arrays are large and short-lived.

By default glibc raises its mmap threshold each time a large block is freed (up to 32 MB) and keeps freed
heap memory in one arena per thread, so the per-window activations and per-layer statistics of a
calibration pass stay resident after use. Serving blocks of 4 MiB or more by mmap (returned to the system
on free), trimming the heap above 4 MiB and using two arenas keeps the process near what it really holds.
Hot loops keep their temporaries under 4 MiB (``gptq.GRID_CHUNK_VALUES``): a fresh mapping per temporary
costs its page faults (at 1 MiB an E2B export took 40 % longer). Elsewhere than glibc this does nothing."""

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
THRESHOLD = 4 << 20


def return_freed_memory() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD)
    libc.mallopt(M_ARENA_MAX, 2)

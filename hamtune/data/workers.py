"""Worker processes for the data layer (decoding, generation): how many, and started safely."""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers and taskset narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for the decode and generation workers.

    fork is fast and needs no importable __main__, but a forked child inherits other threads' locks in whatever state
    they were (Ray, torch and logging threads); so fork only while this process runs a single thread, else spawn.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]
    single_threaded = not others  # tqdm's progress-bar monitor thread holds no locks worth worrying about
    method = "fork" if single_threaded and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))

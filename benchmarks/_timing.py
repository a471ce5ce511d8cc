"""The timing rules every benchmark uses: warm up, then the median of repeated wall-clock times."""

import statistics
import time


def kernels_in_use() -> str:
    """Which CPU kernels the compressors run: the compiled ones, or numpy where they were not built."""
    import saef.compress.kernels
    return "compiled kernels (saef.compress._native)" if saef.compress.kernels.NATIVE is not None else "numpy kernels (saef.compress._native not built)"


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    return interleaved_medians({"fn": fn}, repeats, warmup, block=repeats)["fn"]


def interleaved_medians(fns: dict, repeats: int, warmup: int = 3, block: int = 10) -> dict:
    """Median seconds of each ``fns[name]()`` over ``repeats`` calls, taken in blocks of ``block`` calls
    per function in turn, so that a slow spell of the machine hits all of them alike and their ratios
    stay fair. (Blocks rather than single calls: the first call after switching finds colder caches, and
    in a block only one call in ``block`` pays for it.)"""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(-(-repeats // block)):
        for name, fn in fns.items():
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

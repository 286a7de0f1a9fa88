"""Host latency, throughput and memory of ``.tflite`` files (LiteRT interpreter) and Keras models.

Latency is wall time of ``invoke`` (or of the Keras call) for one batch, warm-up runs excluded, inputs prepared
beforehand (preprocessing not included). Memory is the process's peak resident set while the model is loaded and
run: on Linux the kernel's high-water mark is reset first (``/proc/self/clear_refs``), elsewhere the
process-lifetime peak is reported and marked so. Results use the shared schema of :mod:`kcompress.results`.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from kcompress.bench.schema import BenchReport, BenchResult, host_target, latency_stats
from kcompress.litert.interpreter import TFLiteModel

__all__ = ["bench_tflite", "bench_keras", "bench_report", "rss_mb", "reset_peak_rss", "peak_rss_mb"]


def rss_mb() -> Optional[float]:
    return _status_mb("VmRSS")


def peak_rss_mb() -> Optional[float]:
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return peak


def _status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark for this process (Linux); False when it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory(exact: bool, before: Optional[float], peak: Optional[float]) -> dict:
    """``peak_rss``, and ``rss_increase`` over the resident set before loading when the peak could be reset."""
    known = exact and peak is not None and before is not None
    return {"peak_rss": peak, "rss_increase": (peak - before) if known else None}


def _time_runs(run, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def bench_tflite(
    path_or_bytes,
    threads: int = 1,
    batch_size: int = 1,
    runs: int = 50,
    warmup: int = 10,
    name: Optional[str] = None,
) -> BenchResult:
    """One configuration of a ``.tflite`` in the LiteRT interpreter (XNNPACK on CPU, the interpreter's default)."""
    exact = reset_peak_rss()
    before = rss_mb()
    t0 = time.perf_counter()
    model = TFLiteModel(path_or_bytes, num_threads=threads, batch_size=batch_size)
    init_ms = (time.perf_counter() - t0) * 1000.0
    rng = np.random.default_rng(0)
    x = model.prepare(rng.uniform(0, 1, (batch_size, *model.input_shape)).astype(np.float32))
    model.set_raw_input(x)
    t0 = time.perf_counter()
    model.invoke()
    first_ms = (time.perf_counter() - t0) * 1000.0
    times = _time_runs(model.invoke, warmup, runs)
    stats = latency_stats(times)
    peak = peak_rss_mb()
    size = len(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else os.path.getsize(path_or_bytes)
    return BenchResult(
        model=name or (path_or_bytes if isinstance(path_or_bytes, str) else "<tflite>"),
        runtime="litert-python",
        threads=threads,
        batch_size=batch_size,
        delegate="xnnpack",
        model_bytes=size,
        warmup_runs=warmup,
        latency_ms=stats,
        throughput_per_s=batch_size / (stats.mean / 1000.0) if stats.mean > 0 else None,
        init_ms=init_ms,
        first_inference_ms=first_ms,
        memory_mb=_memory(exact, before, peak),
        extra={"peak_rss_is_process_lifetime": not exact},
    )


def bench_keras(model, batch_size: int = 1, runs: int = 30, warmup: int = 5, name: Optional[str] = None) -> BenchResult:
    """Latency of a compiled (``tf.function``) Keras forward pass. TensorFlow picks its own thread count."""
    from kcompress.backend import tf
    from kcompress.modelinfo import input_shape

    exact = reset_peak_rss()
    before = rss_mb()
    shape = input_shape(model)
    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (batch_size, *shape)).astype(np.float32))
    fn = tf.function(lambda t: model(t, training=False))
    t0 = time.perf_counter()
    fn(x).numpy()
    first_ms = (time.perf_counter() - t0) * 1000.0
    times = _time_runs(lambda: fn(x).numpy(), warmup, runs)
    stats = latency_stats(times)
    peak = peak_rss_mb()
    return BenchResult(
        model=name or model.name,
        runtime="keras",
        threads=None,
        batch_size=batch_size,
        delegate="tensorflow",
        warmup_runs=warmup,
        latency_ms=stats,
        throughput_per_s=batch_size / (stats.mean / 1000.0) if stats.mean > 0 else None,
        first_inference_ms=first_ms,
        memory_mb=_memory(exact, before, peak),
    )


def bench_report(
    paths: Sequence[str],
    threads: Sequence[int] = (1,),
    batch_sizes: Sequence[int] = (1,),
    runs: int = 50,
    warmup: int = 10,
) -> BenchReport:
    """Every model x threads x batch size, on this host."""
    results = []
    for path in paths:
        for t in threads:
            for b in batch_sizes:
                results.append(bench_tflite(path, threads=t, batch_size=b, runs=runs, warmup=warmup))
    return BenchReport(target=host_target(**versions()), results=tuple(results))


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("ai-edge-litert", "tensorflow", "tf-keras", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["omp_threads"] = os.environ.get("OMP_NUM_THREADS", "")
    return out

"""Host latency, throughput and memory of ``.tflite`` files (LiteRT interpreter), ``.onnx`` files (ONNX Runtime,
CPU) and Keras models.

Each ``.tflite`` is measured in a child process (``python -m kcompress.bench.host``) that imports only numpy,
the LiteRT interpreter and this TensorFlow-free module, never TensorFlow: the caller's process usually holds
TensorFlow (hundreds of MB, its own thread pools), which would swamp the memory figure and compete with the
timed threads. The child records its resident set after the imports, loads the model, allocates the tensors,
runs the inferences and reports its peak resident set and the increase over the post-import baseline; latency is
timed in the same child, on the same interpreter. ``.onnx`` files get the same design with ONNX Runtime in place
of LiteRT (``runtime: "onnxruntime"``; ``init_ms`` is the session creation, ``first_inference_ms`` the first run,
both outside the warm percentiles; threads are ONNX Runtime's intra-op threads, inter-op 1).

Latency is wall time of ``invoke`` for one batch, warm-up runs excluded, inputs prepared beforehand (quantized
for int8 I/O, so preprocessing is not included). It is measured in ``trials`` trials of ``runs`` runs; when
several models are measured together their trials are interleaved (A1 B1 A2 B2 ...), so a slow spell of the host
hits every model alike and trial i of two models forms a pair for speed-up ratios (:func:`~kcompress.bench.schema
.speedup`). Results use the shared schema of :mod:`kcompress.bench.schema`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np

from kcompress.bench.schema import BenchReport, BenchResult, Spread, host_target, latency_stats
from kcompress.errors import KcompressError

__all__ = ["bench_tflite", "bench_tflite_many", "bench_keras", "bench_report", "rss_mb", "reset_peak_rss",
           "peak_rss_mb"]

DEFAULT_TRIALS = 5


# ------------------------------------------------------------------------------------------------ memory readings
def rss_mb() -> Optional[float]:
    """This process's resident set now (Linux), else None."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident set: the kernel's high-water mark (Linux), else ``ru_maxrss``, which is
    kilobytes on Linux and bytes on macOS."""
    peak = _status_mb("VmHWM")
    if peak is None:
        try:
            import resource
        except ImportError:  # Windows
            return None
        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = raw / 2**20 if sys.platform == "darwin" else raw / 1024.0
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


def _time_runs(run, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _trial_fields(trials: list[list[float]], batch_size: int) -> dict:
    """``latency_ms`` (every run pooled), ``throughput_per_s`` and the ``extra`` keys of repeated trials."""
    stats = latency_stats([t for trial in trials for t in trial])
    per_trial = [latency_stats(t) for t in trials]
    return {
        "latency_ms": stats,
        "throughput_per_s": batch_size / (stats.mean / 1000.0) if stats.mean > 0 else None,
        "extra": {"trials": [dataclasses.asdict(s) for s in per_trial],
                  "p50_interval_ms": Spread.of([s.p50 for s in per_trial]).to_dict()},
    }


# ---------------------------------------------------------------------------------------- the child (TF-free)
class _ORTRunner:
    """An ONNX model with the interface the child times (``prepare``/``set_raw_input``/``invoke``)."""

    def __init__(self, path: str, threads: int, batch_size: int):
        from kcompress.onnx.runtime import ONNXModel

        self.model = ONNXModel(path, num_threads=threads, batch_size=batch_size)
        self.batch_size = self.model.batch_size
        self.input_shape = self.model.input_shape
        self.input_dtype = self.model.input_dtype
        self.output_dtype = self.model.output_dtype
        self._x = None
        if any(d is None for d in self.input_shape):
            raise KcompressError(f"{path}: the model's input shape {self.input_shape} has free dimensions; "
                                 "benchmark a model exported with a fixed input size")

    def prepare(self, x):
        return self.model.prepare(x)

    def set_raw_input(self, x) -> None:
        self._x = x

    def invoke(self) -> None:
        self.model.run(self._x)

    def delegation(self) -> dict:
        return {"delegate": "cpu", "partitions": 0, "providers": self.model.session.get_providers()}


def _child_main() -> None:
    """One model in this process: a line of JSON settings in, a line of JSON out per command (``{"runs": N,
    "warmup": W}`` times one trial after W untimed runs; end of input or ``{}`` reports memory and exits).
    ``sys.argv[1]`` names the runtime: ``litert`` (default) or ``onnxruntime``."""
    onnx = len(sys.argv) > 1 and sys.argv[1] == "onnxruntime"
    if onnx:
        import onnxruntime  # noqa: F401  (the import is part of the baseline, not of the model)

        import kcompress.onnx.runtime  # noqa: F401
    else:
        import ai_edge_litert.interpreter  # noqa: F401
    from kcompress.litert.interpreter import TFLiteModel

    baseline = rss_mb()
    if baseline is None:  # no /proc: the peak so far is the resident set after the imports, near enough
        baseline = peak_rss_mb()

    def send(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    spec = json.loads(sys.stdin.readline())
    t0 = time.perf_counter()
    try:
        if onnx:
            model: Any = _ORTRunner(spec["model"], spec["threads"], spec["batch_size"])
        else:
            model = TFLiteModel(spec["model"], num_threads=spec["threads"], batch_size=spec["batch_size"])
    except KcompressError as e:
        send({"error": str(e)})
        return
    if model.batch_size != spec["batch_size"]:  # a graph built for a fixed batch: timing another would be a lie
        send({"error": f"{spec['model']}: the model's batch is fixed at {model.batch_size} (its graph cannot be "
                       f"resized to {spec['batch_size']}); benchmark it at batch size {model.batch_size}"})
        return
    init_ms = (time.perf_counter() - t0) * 1000.0
    rng = np.random.default_rng(0)
    model.set_raw_input(model.prepare(rng.uniform(0, 1, (model.batch_size, *model.input_shape)).astype(np.float32)))
    t0 = time.perf_counter()
    model.invoke()
    first_ms = (time.perf_counter() - t0) * 1000.0
    for _ in range(spec["warmup"]):
        model.invoke()
    send({"init_ms": init_ms, "first_inference_ms": first_ms, "delegation": model.delegation(),
          "io": {"input": np.dtype(model.input_dtype).name, "output": np.dtype(model.output_dtype).name},
          "tensorflow_imported": "tensorflow" in sys.modules})
    for line in sys.stdin:
        cmd = json.loads(line)
        if not cmd.get("runs"):
            break
        send({"times_ms": _time_runs(model.invoke, int(cmd.get("warmup", 0)), int(cmd["runs"]))})
    peak = peak_rss_mb()
    send({"baseline_rss": baseline, "peak_rss": peak,
          "rss_increase": peak - baseline if peak is not None and baseline is not None else None})


class _Child:
    """The parent's handle on one child process."""

    def __init__(self, path: str, runtime: str = "litert"):
        import kcompress

        root = os.path.dirname(os.path.dirname(os.path.abspath(kcompress.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.path = path
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "kcompress.bench.host", runtime], cwd=root, env=env,
                                     text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)

    def ask(self, cmd: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the child is gone; readline says why
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            raise KcompressError(f"the benchmark process for {self.path} exited with code {self.proc.returncode}"
                                 + (": " + " / ".join(tail) if tail else ""))
        reply = json.loads(line)
        if "error" in reply:
            raise KcompressError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            f.close()


def bench_tflite_many(
    models: Sequence,
    threads: int = 1,
    batch_size: int = 1,
    runs: int = 50,
    warmup: int = 10,
    trials: int = DEFAULT_TRIALS,
    names: Optional[Sequence[Optional[str]]] = None,
) -> list[BenchResult]:
    """Several ``.tflite`` or ``.onnx`` files (paths or bytes) in one configuration, each in its own child process
    that imports only its runtime (LiteRT or ONNX Runtime), their ``trials`` trials of ``runs`` runs interleaved.
    One :class:`BenchResult` per model, in order."""
    from kcompress.onnx.runtime import is_onnx

    if runs < 1 or trials < 1 or warmup < 0:
        raise ValueError("runs and trials must be at least 1, warmup at least 0")
    names = list(names or [None] * len(models))
    paths, sizes, temps, children = [], [], [], []
    runtimes = ["onnxruntime" if is_onnx(m) else "litert" for m in models]
    try:
        for m, rt in zip(models, runtimes):
            if isinstance(m, (bytes, bytearray)):
                with tempfile.NamedTemporaryFile(suffix=".onnx" if rt == "onnxruntime" else ".tflite",
                                                 delete=False) as f:
                    f.write(bytes(m))
                temps.append(f.name)
                paths.append(f.name)
            else:
                paths.append(os.path.abspath(str(m)))
            sizes.append(os.path.getsize(paths[-1]))
        children = [_Child(p, rt) for p, rt in zip(paths, runtimes)]  # start in parallel, load one by one
        setup = [c.ask({"model": p, "threads": threads, "batch_size": batch_size, "warmup": warmup})
                 for c, p in zip(children, paths)]
        times: list[list[list[float]]] = [[] for _ in children]
        rewarm = min(warmup, 2)  # the caches the other models' trials took over
        for _ in range(trials):
            for i, c in enumerate(children):
                times[i].append(c.ask({"runs": runs, "warmup": rewarm})["times_ms"])
        memory = [c.ask({}) for c in children]
    finally:
        for c in children:
            c.close()
        for t in temps:
            os.unlink(t)
    results = []
    for model, rt, size, name, s, t, mem in zip(models, runtimes, sizes, names, setup, times, memory):
        fields = _trial_fields(t, batch_size)
        d = s["delegation"]
        onnx = rt == "onnxruntime"
        results.append(BenchResult(
            model=name or (str(model) if not isinstance(model, (bytes, bytearray)) else
                           "<onnx>" if onnx else "<tflite>"),
            runtime="onnxruntime" if onnx else "litert-python",
            threads=threads,
            batch_size=batch_size,
            delegate=d["delegate"],
            model_bytes=size,
            warmup_runs=warmup,
            latency_ms=fields["latency_ms"],
            throughput_per_s=fields["throughput_per_s"],
            init_ms=s["init_ms"],
            first_inference_ms=s["first_inference_ms"],
            memory_mb={**mem, "arena": None},
            delegate_coverage=d if d["partitions"] else None,
            extra={**fields["extra"], "io": s["io"], "runs_per_trial": runs,
                   "memory_scope": f"child process: {'ONNX Runtime' if onnx else 'LiteRT interpreter'} only",
                   "tensorflow_imported": s["tensorflow_imported"],
                   **({"providers": d.get("providers")} if onnx else {})},
        ))
    return results


def bench_tflite(
    path_or_bytes,
    threads: int = 1,
    batch_size: int = 1,
    runs: int = 50,
    warmup: int = 10,
    name: Optional[str] = None,
    trials: int = DEFAULT_TRIALS,
) -> BenchResult:
    """One configuration of a ``.tflite`` in the LiteRT interpreter, in a child process (module docstring). The
    interpreter applies XNNPACK where it can; ``delegate`` records what actually ran."""
    return bench_tflite_many([path_or_bytes], threads, batch_size, runs, warmup, trials, [name])[0]


def bench_keras(model, batch_size: int = 1, runs: int = 30, warmup: int = 5, name: Optional[str] = None,
                trials: int = DEFAULT_TRIALS) -> BenchResult:
    """Latency of a compiled (``tf.function``) Keras forward pass, in this process (TensorFlow picks its own thread
    count). Memory is this whole TensorFlow process's: the peak since a reset of the kernel's mark (Linux), else
    the process-lifetime peak."""
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
    _time_runs(lambda: fn(x).numpy(), warmup, 0)
    fields = _trial_fields([_time_runs(lambda: fn(x).numpy(), 0, runs) for _ in range(trials)], batch_size)
    peak = peak_rss_mb()
    known = exact and peak is not None and before is not None
    return BenchResult(
        model=name or model.name,
        runtime="keras",
        threads=None,
        batch_size=batch_size,
        delegate="tensorflow",
        warmup_runs=warmup,
        latency_ms=fields["latency_ms"],
        throughput_per_s=fields["throughput_per_s"],
        first_inference_ms=first_ms,
        memory_mb={"peak_rss": peak, "rss_increase": (peak - before) if known else None},
        extra={**fields["extra"], "runs_per_trial": runs, "peak_rss_is_process_lifetime": not exact,
               "memory_scope": "this process, TensorFlow included"},
    )


def bench_report(
    paths: Sequence[str],
    threads: Sequence[int] = (1,),
    batch_sizes: Sequence[int] = (1,),
    runs: int = 50,
    warmup: int = 10,
    trials: int = DEFAULT_TRIALS,
) -> BenchReport:
    """Every model x threads x batch size, on this host; the models' trials interleaved per configuration. Results
    are ordered model, then threads, then batch size."""
    by_config = {(t, b): bench_tflite_many(paths, t, b, runs, warmup, trials) for t in threads for b in batch_sizes}
    results = [by_config[t, b][i] for i in range(len(paths)) for t in threads for b in batch_sizes]
    return BenchReport(target=host_target(**versions()), results=tuple(results))


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("ai-edge-litert", "onnxruntime", "tensorflow", "tf-keras", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["omp_threads"] = os.environ.get("OMP_NUM_THREADS", "")
    return out


if __name__ == "__main__":
    _child_main()

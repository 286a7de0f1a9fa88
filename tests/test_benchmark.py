import json

import numpy as np
import pytest

from kcompress.bench.host import bench_report, bench_tflite, bench_tflite_many, rss_mb
from kcompress.bench.schema import SCHEMA, BenchReport, BenchResult, Spread, clearly_slower, latency_stats, speedup
from kcompress.litert.interpreter import TFLiteModel, delegation, tflite_ops
from kcompress.quantization.ptq import convert

# The result fields of kcompress.bench/1 as first released: a reader of that version builds BenchResult(**d), so a
# new writer must not add top-level keys (new data goes under extra / memory_mb).
V1_RESULT_KEYS = {"model", "runtime", "threads", "batch_size", "delegate", "model_bytes", "warmup_runs", "latency_ms",
                  "throughput_per_s", "init_ms", "first_inference_ms", "warmup_mean_ms", "memory_mb",
                  "delegate_coverage", "op_profile", "extra"}
V1_STATS_KEYS = {"count", "mean", "std", "min", "max", "p50", "p95", "p99"}


def _dense_tflite(n_in: int, n_out: int, tmp_path, name: str, int8: bool = False) -> str:
    """Dense(n_in -> n_out) + softmax as a .tflite: about 4 * n_in * n_out bytes of float weights (1 for int8)."""
    from kcompress.backend import keras
    from kcompress.options import QuantizeOptions
    from kcompress.types import QuantMode

    inp = keras.Input((n_in,))
    model = keras.Model(inp, keras.layers.Softmax()(keras.layers.Dense(n_out)(inp)))
    if int8:
        rng = np.random.default_rng(0)
        data = convert(model, QuantizeOptions(mode=QuantMode.INT8),
                       calibration=lambda: (rng.uniform(0, 1, (1, n_in)) for _ in range(8)))
    else:
        data = convert(model)
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(data)
    return str(path)


def test_latency_stats_match_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    s = latency_stats(values)
    assert s.p50 == np.percentile(values, 50) and s.p95 == np.percentile(values, 95)
    assert s.min == 1.0 and s.max == 10.0 and s.count == 6
    assert abs(s.std - np.std(values)) < 1e-12


def test_bench_report_round_trips_through_json(trained_cnn, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(convert(trained_cnn))
    report = bench_report([str(path)], threads=(1, 2), batch_sizes=(1, 4), runs=5, warmup=1, trials=3)
    doc = json.loads(report.to_json())
    assert doc["schema"] == SCHEMA and doc["target"]["kind"] == "host"
    assert [(r["threads"], r["batch_size"]) for r in doc["results"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    r = doc["results"][1]
    assert r["latency_ms"]["count"] == 15 and r["latency_ms"]["p50"] > 0  # 3 trials x 5 runs, pooled
    assert abs(r["throughput_per_s"] - 4 / (r["latency_ms"]["mean"] / 1000)) < 1e-6
    back = BenchReport.from_dict(doc).results[1]
    assert back.latency_ms == report.results[1].latency_ms and back.trials == report.results[1].trials
    assert back.p50_interval == report.results[1].p50_interval
    for res in doc["results"]:  # an older kcompress.bench/1 reader still loads every result
        assert set(res) == V1_RESULT_KEYS and set(res["latency_ms"]) == V1_STATS_KEYS


def test_trials_and_spread_are_consistent(tmp_path):
    path = _dense_tflite(64, 256, tmp_path, "m")
    r = bench_tflite(path, runs=7, warmup=2, trials=4)
    assert len(r.trials) == 4 and all(t.count == 7 for t in r.trials)
    assert r.latency_ms.count == 28 and r.warmup_runs == 2 and r.extra["runs_per_trial"] == 7
    assert r.latency_ms.min == min(t.min for t in r.trials) and r.latency_ms.max == max(t.max for t in r.trials)
    p50s = [t.p50 for t in r.trials]
    p = r.p50_interval
    assert p.trials == 4 and p.low == min(p50s) and p.high == max(p50s) and p.median == pytest.approx(np.median(p50s), rel=1e-12)
    assert p.contains(p.median) and p.low <= p.median <= p.high
    assert r.trial_p50s == tuple(p50s)


def test_cold_start_is_recorded_apart_from_the_warm_runs(tmp_path):
    from conftest import run_cli

    path = _dense_tflite(64, 256, tmp_path, "m")
    r = bench_tflite(path, runs=3, warmup=0, trials=1)
    assert r.init_ms > 0 and r.first_inference_ms > 0
    assert r.latency_ms.count == 3  # the first inference is not one of the timed runs, even with no warm-up
    out = run_cli("bench", path, "--runs", "3", "--warmup", "0", "--trials", "1")
    assert out.exit_code == 0 and "load ms" in out.output and "first ms" in out.output


def test_bigger_model_reports_more_inference_memory(tmp_path):
    small = _dense_tflite(50, 1000, tmp_path, "small")  # 200 kB of weights
    big = _dense_tflite(1000, 2000, tmp_path, "big")  # 8 MB of weights
    rs, rb = bench_tflite_many([small, big], runs=5, warmup=1, trials=2)
    ms, mb = rs.memory_mb, rb.memory_mb
    weights_mb = (1000 * 2000 - 50 * 1000) * 4 / 2**20
    # the 7.4 MB of extra weights are at least mapped in (XNNPACK also packs a copy)
    assert mb["rss_increase"] - ms["rss_increase"] > 0.75 * weights_mb
    assert mb["peak_rss"] - ms["peak_rss"] > 0.75 * weights_mb
    for m in (ms, mb):
        assert m["rss_increase"] == pytest.approx(m["peak_rss"] - m["baseline_rss"])
        assert m["rss_increase"] > 0 and m["arena"] is None
    # measured in a child that holds the interpreter only: not this process, which holds TensorFlow
    assert not rs.extra["tensorflow_imported"] and not rb.extra["tensorflow_imported"]
    assert abs(ms["baseline_rss"] - mb["baseline_rss"]) < 5
    assert mb["peak_rss"] < rss_mb() - 100


def test_delegate_is_read_from_the_interpreter(tmp_path):
    path = _dense_tflite(32, 16, tmp_path, "m")
    r = bench_tflite(path, runs=3, warmup=0, trials=1)
    ops = len(tflite_ops(path))  # the plain graph: FULLY_CONNECTED, SOFTMAX
    assert r.delegate == "xnnpack" == TFLiteModel(path).delegation()["delegate"]
    assert r.delegate_coverage == {"delegate": "xnnpack", "partitions": 1, "replaced_nodes": ops, "total_nodes": ops}
    assert TFLiteModel(path, delegates=False).delegation() == {"delegate": "cpu", "partitions": 0,
                                                                "replaced_nodes": 0, "total_nodes": ops}


def test_delegation_finds_the_replaced_nodes_of_each_partition():
    def op(i, name, ins, outs):
        return {"index": i, "op_name": name, "inputs": np.array(ins), "outputs": np.array(outs)}

    # t0 -> FC -> t2 -> RELU -> t3 -> CUMSUM -> t4 -> FC -> t6 -> SOFTMAX -> t7; weights t1, t5; -1 = no tensor
    ops = [op(0, "FULLY_CONNECTED", [0, 1, -1], [2]), op(1, "RELU", [2], [3]), op(2, "CUMSUM", [3], [4]),
           op(3, "FULLY_CONNECTED", [4, 5, -1], [6]), op(4, "SOFTMAX", [6], [7]),
           op(5, "DELEGATE", [0, 1], [3]), op(6, "DELEGATE", [4, 5], [7])]
    assert delegation(ops) == {"delegate": "xnnpack", "partitions": 2, "replaced_nodes": 4, "total_nodes": 5}
    assert delegation(ops[:5])["delegate"] == "cpu"


def test_timed_io_type_is_recorded(tmp_path):
    fp32 = _dense_tflite(16, 8, tmp_path, "f")
    int8 = _dense_tflite(16, 8, tmp_path, "q", int8=True)
    rf, rq = bench_tflite_many([fp32, int8], runs=3, warmup=0, trials=2)
    assert rf.extra["io"] == {"input": "float32", "output": "float32"}
    assert rq.extra["io"] == {"input": "int8", "output": "int8"} == {
        "input": np.dtype(TFLiteModel(int8).input_dtype).name, "output": np.dtype(TFLiteModel(int8).output_dtype).name}


def test_speedup_interval_from_trial_p50s():
    s = speedup([10.0, 11.0, 12.0], [5.0, 5.5, 4.0])  # paired trials: ratios 2, 2, 3
    assert (s.median, s.low, s.high, s.trials, s.paired) == (2.0, 2.0, 3.0, 3, True)
    assert s.text() == "2.00x (2.00-3.00x, 3 trials)"
    u = speedup([10.0, 12.0], [5.0, 6.0, 4.0])  # unpaired: every ratio, 10/6 .. 12/4
    assert not u.paired and u.low == pytest.approx(10 / 6) and u.high == 3.0 and u.median == pytest.approx(2.2)
    assert speedup([10.0, 12.0], [5.0, 4.0], paired=False).high == 3.0  # timed apart: 12/4 counts too
    one = speedup([2.0], [4.0])
    assert (one.median, one.low, one.high) == (0.5, 0.5, 0.5) and one.text() == "0.50x (0.50-0.50x, 1 trial)"
    with pytest.raises(ValueError):
        speedup([], [1.0])


def test_slower_only_when_the_trial_ranges_do_not_overlap():
    base = [1.0, 1.1, 1.2]
    assert not clearly_slower(base, [1.15, 1.3, 1.4], margin=1.05)  # overlaps base's 1.2: no verdict
    assert clearly_slower(base, [1.3, 1.4, 1.5], margin=1.05)
    assert not clearly_slower(base, [0.5, 0.6, 0.7])  # faster
    assert not clearly_slower([1.0, 1.0], [1.01, 1.02], margin=1.05)  # apart, but by less than the margin
    assert Spread.of(base).overlaps(Spread.of([1.2, 2.0])) and not Spread.of(base).overlaps(Spread.of([1.3]))


def test_quantize_hint_and_compare_speedup_use_the_intervals():
    from kcompress.options import QuantizeOptions
    from kcompress.pipeline.compare import Comparison
    from kcompress.quantization.api import QuantizeResult
    from kcompress.types import QuantMode

    def result(fp32, quant):
        return QuantizeResult(tflite=b"", fp32_tflite=b"", options=QuantizeOptions(mode=QuantMode.DYNAMIC),
                              model="m", data="d", before=None, after=None, source_bytes=None,
                              latency_fp32_ms=float(np.median(fp32)), latency_ms=float(np.median(quant)),
                              latency_fp32_trials_ms=tuple(fp32), latency_trials_ms=tuple(quant))

    overlapping = result([1.0, 1.1, 1.5], [1.4, 1.6, 1.7])  # median 1.45x slower, but the ranges overlap
    assert not overlapping.slower and overlapping.hint is None
    apart = result([1.0, 1.1, 1.2], [2.0, 2.2, 2.2])  # ratios 0.5, 0.5, 0.545
    assert apart.slower and apart.speedup.high < 1
    assert apart.hint.startswith("dynamic measured 2.00x SLOWER than fp32 here (1.83-2.00x over 3 trials")
    c = Comparison("d", {"latency_p50_trials_ms": [2.0, 2.2, 1.8]}, {"latency_p50_trials_ms": [1.0, 1.0, 1.2]}, {})
    assert c.speedup.text() == "2.00x (1.50-2.20x, 3 trials)" and c.latency_ratio == 2.0


def test_older_json_loads(tmp_path):
    old = {"schema": "kcompress.bench/1", "kcompress_version": "0.1.0", "created": "2025-01-01T00:00:00+0000",
           "target": {"kind": "host", "cpu": "x"},
           "results": [{"model": "m.tflite", "runtime": "litert-python", "threads": 1, "batch_size": 1,
                        "delegate": "xnnpack", "model_bytes": 1000, "warmup_runs": 10,
                        "latency_ms": {"count": 50, "mean": 1.1, "std": 0.1, "min": 1.0, "max": 1.5, "p50": 1.05,
                                       "p95": 1.3, "p99": 1.4},
                        "throughput_per_s": 909.1, "init_ms": 3.0, "first_inference_ms": 2.0, "warmup_mean_ms": None,
                        "memory_mb": {"peak_rss": 420.0, "rss_increase": 3.0}, "delegate_coverage": None,
                        "op_profile": None, "extra": {"peak_rss_is_process_lifetime": False}},
                       {"model": "m.tflite", "runtime": "benchmark_model", "threads": 4, "batch_size": 1,
                        "delegate": "gpu", "latency_ms": None, "extra": {"inference_avg_ms": 2.5}}]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    from kcompress.bench.schema import load_report

    host, device = load_report(str(path)).results
    assert host.trials == () and host.trial_p50s == (1.05,)
    assert host.p50_interval == Spread(median=1.05, low=1.05, high=1.05, trials=1)
    assert device.trial_p50s == () and device.p50_interval is None
    # a key from a newer writer is kept (in extra), not fatal
    newer = BenchResult.from_dict({**old["results"][0], "energy_mj": 7.0})
    assert newer.extra["energy_mj"] == 7.0 and newer.latency_ms.p50 == 1.05

import json

from kcompress.bench.host import bench_report, bench_tflite
from kcompress.bench.schema import SCHEMA, BenchReport, latency_stats
from kcompress.quantization.ptq import convert


def test_latency_stats_match_numpy():
    import numpy as np

    values = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    s = latency_stats(values)
    assert s.p50 == np.percentile(values, 50) and s.p95 == np.percentile(values, 95)
    assert s.min == 1.0 and s.max == 10.0 and s.count == 6
    assert abs(s.std - np.std(values)) < 1e-12


def test_bench_report_round_trips_through_json(trained_cnn, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(convert(trained_cnn))
    report = bench_report([str(path)], threads=(1, 2), batch_sizes=(1, 4), runs=5, warmup=1)
    doc = json.loads(report.to_json())
    assert doc["schema"] == SCHEMA and doc["target"]["kind"] == "host"
    assert [(r["threads"], r["batch_size"]) for r in doc["results"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    r = doc["results"][1]
    assert r["latency_ms"]["count"] == 5 and r["latency_ms"]["p50"] > 0
    assert abs(r["throughput_per_s"] - 4 / (r["latency_ms"]["mean"] / 1000)) < 1e-6
    assert r["memory_mb"]["peak_rss"] > 50
    assert BenchReport.from_dict(doc).results[1].latency_ms.p50 == r["latency_ms"]["p50"]


def test_bench_tflite_counts_runs(trained_cnn):
    r = bench_tflite(convert(trained_cnn), runs=7, warmup=2)
    assert r.latency_ms.count == 7 and r.warmup_runs == 2 and r.model_bytes > 100_000

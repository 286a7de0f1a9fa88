"""Strategy advice: from a model and its constraints to a pipeline config, with the reason for each choice.

The rules (what each target needs):
- ``edge-tpu``: the Edge TPU compiler takes only fully integer models: int8 everywhere, integer I/O, no float
  fallback; QAT when PTQ loses too much.
- ``mcu``: TFLite Micro runs int8 kernels and has kilobytes to a few MB of flash: int8 with integer I/O, and the
  size cut must come from distillation or structured pruning (sparsity does not shrink flash without compression).
- ``mobile-gpu``: GPU delegates compute in float16: float16 weights halve the size at almost no accuracy cost;
  int8 would be dequantized on the GPU anyway.
- ``mobile-cpu``: XNNPACK's int8 kernels are the fastest CPU path: full int8; structured pruning when the latency
  budget needs fewer FLOPs (unstructured sparsity gives no speed-up there).
- ``server-cpu``: int8 with float I/O for drop-in use.
Budgets: the int8 size is estimated as about one byte per parameter; the latency from the fp32 ``.tflite``
measured on this host (a proxy: the device is usually slower) divided by the int8 speed-up *measured* on this host
(the model converted to int8 with a stratified calibration sample, both timed in interleaved trials). On a CPU
without fast int8 kernels that ratio can be below 1, and the plan says so instead of assuming int8 is faster.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import yaml

from kcompress.errors import UsageError
from kcompress.types import Target

__all__ = ["TARGETS", "recommend"]

TARGETS = Target.values()


def recommend(
    model_path: str,
    target: str,
    data: str = "digits:train",
    val_data: str = "digits:val",
    max_size_mb: Optional[float] = None,
    max_latency_ms: Optional[float] = None,
    max_drop: float = 2.0,
    preprocess: Optional[dict] = None,
    trust_model: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Measures the model and returns ``(yaml_text_with_comments, facts)``; the model file is loaded safely unless
    ``trust_model``."""
    from kcompress.bench.host import bench_tflite_many
    from kcompress.bench.schema import speedup as speedup_of
    from kcompress.data import Preprocess, open_data
    from kcompress.io import load_model
    from kcompress.modelinfo import count_macs, count_params, input_shape
    from kcompress.options import QuantizeOptions
    from kcompress.quantization.ptq import convert

    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    model = load_model(model_path, trust_model=trust_model)
    params = count_params(model)["total"]
    pre = {k: tuple(v) if isinstance(v, list) else v for k, v in (preprocess or {}).items()}
    train = open_data(data, Preprocess(**pre))
    macs = count_macs(model, input_shape=train.sample_shape)
    shape = input_shape(model)
    int8 = convert(model, QuantizeOptions(mode="int8", io="float"),
                   calibration=lambda: train.calibration_samples(shape, 100))
    fp32_r, int8_r = bench_tflite_many([convert(model), int8], threads=1, runs=30, warmup=5, trials=5)
    fp32_ms = fp32_r.p50_interval.median
    measured = speedup_of(fp32_r.trial_p50s, int8_r.trial_p50s)
    facts = {"params": params, "macs": macs, "fp32_bytes": params * 4, "fp32_tflite_p50_ms": fp32_ms,
             "int8_speedup_host": measured.to_dict()}
    why: dict[str, str] = {}
    q: dict[str, Any] = {"enabled": True, "qat": "auto"}
    if target == "mobile-gpu":
        q.update(mode="float16", io="float", qat="never")
        why["quantize"] = "mobile GPU delegates compute in float16: fp16 weights halve the size, accuracy stays"
        est_bytes, speedup = params * 2, 1.0
    else:
        q.update(mode="int8", io="float" if target == "server-cpu" else "int8")
        why["quantize"] = {
            "edge-tpu": "the Edge TPU runs only fully integer models: int8 everywhere with integer I/O",
            "mcu": "microcontrollers run int8 kernels (TFLite Micro) with integer I/O",
            "mobile-cpu": "XNNPACK's int8 kernels are the fastest CPU path; PTQ first, QAT if PTQ misses the floor",
            "server-cpu": "int8 compute with float I/O, a drop-in replacement for the fp32 model",
        }[target]
        est_bytes, speedup = params * 1.05, measured.median
        why["speed"] = (f"int8 measured {measured.text()} the fp32 speed on this host (1 thread)"
                        + ("; here int8 is SLOWER: measure on the target device (kcompress device bench)"
                           if measured.high < 1.0 else ""))
    facts["estimated_quantized_bytes"] = int(est_bytes)
    reduction = 1.0  # fraction of parameters/FLOPs to keep
    if max_size_mb is not None and est_bytes > max_size_mb * 1e6:
        reduction = min(reduction, max_size_mb * 1e6 / est_bytes)
        why["size"] = (f"the quantized model would be about {est_bytes / 1e6:.2f} MB, over the {max_size_mb} MB budget: "
                       f"keep about {100 * reduction:.0f}% of the parameters")
    if max_latency_ms is not None:
        est_ms = fp32_ms / speedup
        facts["estimated_quantized_p50_ms_host"] = est_ms
        if est_ms > max_latency_ms:
            reduction = min(reduction, max_latency_ms / est_ms)
            why["latency"] = (f"estimated {est_ms:.3f} ms on this host after quantization, over {max_latency_ms} ms: "
                              f"keep about {100 * reduction:.0f}% of the FLOPs")
    distill = {"enabled": False}
    prune = {"enabled": False}
    if reduction < 1.0:
        if reduction >= 0.5:
            prune = {"enabled": True, "method": "structured", "target_flops": round(min(0.5, 1 - reduction) + 0.05, 2),
                     "epochs": 4}
            why["prune"] = ("a cut of up to half is within what structured pruning recovers with fine-tuning; it "
                            "removes whole channels, so size and latency both drop")
        else:
            width = round(max(0.25, math.sqrt(reduction * 1.1)), 2)
            distill = {"enabled": True, "student_width": width, "epochs": 15}
            why["distill"] = (f"a cut to {100 * reduction:.0f}% is more than pruning recovers: distill a student at width "
                              f"{width} (parameters scale with width squared)")
            if width ** 2 > reduction:
                prune = {"enabled": True, "method": "structured", "target_flops": 0.3, "epochs": 4}
                why["prune"] = "the student alone does not reach the budget: prune 30% of its FLOPs"
    if target == "mcu" and reduction == 1.0 and est_bytes > 1e6:
        why["mcu_note"] = "over 1 MB after int8: check the board's flash; set --max-size-mb to plan a size cut"
    stages = sum(1 for s in (distill, prune) if s["enabled"]) + 1
    per_stage = round(max_drop / stages, 2)
    for s in (distill, prune):
        if s["enabled"]:
            s["max_drop"] = per_stage
    q["max_drop"] = per_stage
    why["gates"] = f"the overall budget of {max_drop} points is split evenly over {stages} stage(s)"
    cfg = {
        "name": f"{target}-plan",
        "max_drop": max_drop,
        "model": {"path": model_path},
        "data": {"train": data, "val": val_data, **(preprocess or {})},
        "distill": distill,
        "prune": prune,
        "quantize": q,
    }
    from kcompress.pipeline.config import config_from_dict

    config_from_dict(cfg)  # what we write must load
    header = [f"# kcompress recommend --target {target}", f"# model: {params:,} parameters, {macs:,} MACs, "
              f"fp32 .tflite p50 {fp32_ms:.3f} ms on this host (1 thread)"]
    header += [f"# {k}: {v}" for k, v in why.items()]
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False), {**facts, "why": why, "config": cfg}

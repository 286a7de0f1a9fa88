"""The SIMD tile of this host's convolution kernels, measured (``channel_multiple: auto``).

LiteRT's CPU kernels (XNNPACK) compute a convolution's output channels in tiles of a fixed width and pad the last
tile, so a layer with one channel more than a multiple of the tile costs as much as one with a whole tile more.
Measured on a 2-core Intel Xeon (AVX-512), 1 thread, a 3x3 conv on 16x16x32 followed by one back to 32 channels:
16 output channels ran in 59.5 us (fp32) / 19.7 us (int8), 17 in 96.0 / 32.3 us, 31 in 116.7 / 37.5 us, 32 in
100.0 / 31.9 us, 33 in 152.5 / 46.5 us. Channel pruning that keeps 17 or 33 channels removes MACs and keeps most of
the time: ResNet-20 at 50% of its MACs ran 1.28x faster (fp32) with free channel counts, 1.72x with multiples of 16
(``tools/bench_recipe_prune.py``, one run of interleaved trials), but 6 fine-tuning epochs then reached 74.94% VAL
instead of 78.88%: its groups of 16-64 channels rounded to 16 lose too much, so ``auto`` is not the default.
The width differs by CPU and data type, hence the probe rather than a constant: time small two-conv models whose
middle width is ``w`` and ``w + 1`` for ``w`` in :data:`CANDIDATES`, fp32 and int8, interleaved trials, and take
the smallest ``w`` where one more channel costs :data:`JUMP` or more (the larger of the fp32 and int8 answers; 1
when no step shows). The probe takes a few seconds and is measured once per process.

Gotcha: the answer is this host's. A model meant for a phone should be pruned with the phone's tile (measure it
there: Arm kernels are not x86's), or by a latency target measured on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TileProbe", "channel_tile", "tile_from_timings", "slow_speedup", "tile_hint", "CANDIDATES", "JUMP"]

CANDIDATES = (4, 8, 16, 32)  # widths probed: w and w + 1 output channels
LAG = 0.75  # a measured fp32 speed-up under this share of the MACs ratio is worth a hint (slow_speedup)
# t(w + 1) / t(w) at or above this marks a tile boundary. Measured on the Intel Xeon: fp32 1.6 at 16, 1.65 at 32,
# 0.92-1.03 at 4 and 8; int8 1.46 at 16, 1.31 at 32, 1.21 at 8 (int8's answer 8, fp32's 16: the tile used is 16)
JUMP = 1.2
PROBE_HW, PROBE_CIN = 16, 32  # the probe's input: big enough that the kernels' time dominates the per-op overhead


@dataclass(frozen=True)
class TileProbe:
    """``tile``: the channel multiple to use (1: no step found); ``fp32``/``int8``: each data type's own answer;
    ``timings``: ``{"fp32": {w: p50 us}, "int8": {...}}``, the medians of the interleaved trials' p50s."""

    tile: int
    fp32: int
    int8: int
    timings: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.tile == 1:
            return "no SIMD tile step measured on this host (channel counts kept as the search leaves them)"
        t = self.timings["fp32" if self.fp32 == self.tile else "int8"]
        kind = "fp32" if self.fp32 == self.tile else "int8"
        return (f"{self.tile} (the SIMD tile measured on this host: a {kind} conv with {self.tile + 1} output "
                f"channels took {t[self.tile + 1] / t[self.tile]:.2f}x the time of one with {self.tile})")


def tile_from_timings(timings: dict[int, float]) -> int:
    """The smallest probed width ``w`` where ``w + 1`` channels take :data:`JUMP` times as long; 1 when none does."""
    for w in CANDIDATES:
        if timings[w + 1] / timings[w] >= JUMP:
            return w
    return 1


@functools.lru_cache(maxsize=2)
def channel_tile(threads: int = 1, trials: int = 5) -> TileProbe:
    """Measures this host's output-channel tile for LiteRT convolutions at ``threads`` threads (module docstring)."""
    from kcompress.backend import keras
    from kcompress.bench.host import bench_tflite_many
    from kcompress.options import QuantizeOptions
    from kcompress.quantization.ptq import convert

    widths = sorted({v for w in CANDIDATES for v in (w, w + 1)})
    rng = np.random.default_rng(0)
    files = []
    for w in widths:
        x = keras.Input((PROBE_HW, PROBE_HW, PROBE_CIN))
        y = keras.layers.Conv2D(w, 3, padding="same", activation="relu")(x)
        model = keras.Model(x, keras.layers.Conv2D(PROBE_CIN, 3, padding="same")(y))
        sample = rng.random((8, 1, PROBE_HW, PROBE_HW, PROBE_CIN), dtype=np.float32)
        files += [convert(model), convert(model, QuantizeOptions(mode="int8", io="float"), lambda: iter(sample))]
    timed = bench_tflite_many(files, threads=threads, runs=40, warmup=5, trials=trials)
    us = {kind: {w: 1000.0 * timed[2 * i + j].p50_interval.median for i, w in enumerate(widths)}
          for j, kind in enumerate(("fp32", "int8"))}
    f, q = tile_from_timings(us["fp32"]), tile_from_timings(us["int8"])
    return TileProbe(tile=max(f, q), fp32=f, int8=q, timings=us)


def slow_speedup(macs_before: int, macs_after: int, fp32_speedup: float) -> bool:
    """True when at least a quarter of the MACs went but the fp32 speed-up is under :data:`LAG` of the MACs ratio
    (half the MACs and less than 1.5x faster): worth measuring the tile (:func:`tile_hint`)."""
    return macs_after <= 0.75 * macs_before and fp32_speedup < LAG * macs_before / max(macs_after, 1)


def tile_hint(groups: list[dict], tile: int, macs_ratio: float, fp32_speedup: float, granularity: str) -> str:
    """What to try when pruning removed MACs but not the time: how many pruned groups keep a count just above a
    multiple of ``tile`` (paying for a whole tile they barely use), and the options that buy speed instead."""
    over = [g for g in groups if tile > 1 and 0 < g["kept"] % tile <= tile // 2]
    parts = [f"the MACs fell to 1/{macs_ratio:.2f} but the fp32 .tflite ran only {fp32_speedup:.2f}x faster"]
    if over:
        parts.append(f"{len(over)} of {len(groups)} pruned channel groups keep a count just above a multiple of "
                     f"{tile}, this host's SIMD tile (they cost the time of the next multiple): --channel-multiple "
                     "auto rounds to it (down as often as up: compare the accuracy)")
    if granularity == "channel":
        parts.append("small models also spend much of their time per op: --granularity both removes whole blocks "
                     "(fewer ops)")
    return "; ".join(parts)

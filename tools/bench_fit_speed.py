"""Benchmark: seconds per training epoch of small models under ``kcompress.train.fit`` (issue 14's memory notes).

Trains ResNet-20 (CIFAR layout) and MobileNetV2 from :mod:`kcompress.zoo` at 32x32 on scikit-learn's 1,797 digits
(upsampled, 3 channels), batch 128, and prints each epoch's seconds after the first (the first traces) and the
process's peak resident memory. Run it once per environment setting to compare TensorFlow's allocator or kernel
options, interleaving the runs and repeating them, e.g.::

    for v in 0 1 0 1; do TF_ONEDNN_USE_SYSTEM_ALLOCATOR=$v python tools/bench_fit_speed.py; done
    TF_ENABLE_ONEDNN_OPTS=0 python tools/bench_fit_speed.py

Measured (2-core Intel Xeon, AVX-512; README "Memory"): about 3.0 s per epoch for both models by default, 5.0 / 4.7 s
with ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1``, 13.3 / 6.0 s with ``TF_ENABLE_ONEDNN_OPTS=0``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ENV = ("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "TF_ENABLE_ONEDNN_OPTS")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4, help="the first is not timed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)

    from profile_qat import digits32

    import kcompress as kc
    from kcompress.backend import keras
    from kcompress.bench.host import peak_rss_mb
    from kcompress.data import Preprocess
    from kcompress.train import fit
    from kcompress.zoo import mobilenetv2, resnet_cifar

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.t0 = [], 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t0)

    env = ", ".join(f"{k}={os.environ[k]}" for k in ENV if k in os.environ) or "default environment"
    with tempfile.TemporaryDirectory() as tmp:
        data = kc.open_data(digits32(1797, 32, os.path.join(tmp, "d.npz")), Preprocess(scale=1 / 255))
        for name, build in (("resnet20", resnet_cifar), ("mobilenetv2", mobilenetv2)):
            keras.utils.set_random_seed(0)
            model, cb = build(), EpochTimes()
            fit(model, data, epochs=args.epochs, batch_size=args.batch_size, verbose=0, callbacks=[cb])
            print(f"{name} ({env}): s/epoch after the first {[round(t, 2) for t in cb.times[1:]]}, "
                  f"peak {peak_rss_mb() / 1024:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

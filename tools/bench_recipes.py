"""Benchmark: training recipes (optimizer, learning rate, schedule) on scikit-learn digits, the measurement behind
the ``train`` section's defaults.

Trains each model from scratch with :func:`kcompress.train.fit` for every recipe and seed (digits:train, best epoch
on digits:val, pixels scaled by 1/255 as in the tests) and prints the mean, min and max VAL accuracy per recipe.
The other stages start from a digits_cnn trained for 10 epochs (Adam 2e-3): ``--stage distill`` distills it into a
half-width student; ``structured`` fine-tunes it after removing 50% of its FLOPs (one round); ``magnitude`` prunes
it to 80% sparsity with fine-tuning; ``qat`` fine-tunes it quantization-aware (the int8 .tflite is measured).

    nice -n 10 python tools/bench_recipes.py --epochs 5 15 --seeds 0 1 2
    nice -n 10 python tools/bench_recipes.py --stage distill --epochs 10 --recipes adam:1e-3:constant sgd:0.05:cosine
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_RECIPES = ["adam:1e-3:constant", "adam:2e-3:constant", "adam:2e-3:cosine", "adamw:2e-3:cosine",
                   "sgd:0.02:cosine", "sgd:0.05:cosine", "sgd:0.1:cosine"]


def small_bn_cnn(input_shape=(8, 8, 1), num_classes=10):
    """Conv-BN-ReLU x3 (the last with stride 2), global average pooling, softmax: 6k parameters."""
    from kcompress.backend import keras

    L = keras.layers
    inp = L.Input(input_shape)
    x = inp
    for i, (f, s) in enumerate(((16, 1), (32, 1), (32, 2))):
        x = L.Conv2D(f, 3, strides=s, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(num_classes, activation="softmax")(x))


def parse(spec: str):
    opt, lr, sched, *rest = spec.split(":")
    return opt, float(lr), sched, float(rest[0]) if rest else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("train", "distill", "structured", "magnitude", "qat"), default="train")
    p.add_argument("--models", nargs="+", default=["digits_cnn", "small_bn_cnn"])
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="OPTIMIZER:LR:SCHEDULE[:WEIGHT_DECAY]")
    p.add_argument("--epochs", nargs="+", type=int, default=[5, 15])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    from kcompress.backend import keras
    from kcompress.data import Preprocess, open_data
    from kcompress.options import DistillOptions, PruneOptions, QATOptions, TrainOptions
    from kcompress.train import fit
    from kcompress.zoo import digits_cnn

    pre = Preprocess(scale=1 / 255)
    train, val = open_data("digits:train", pre), open_data("digits:val", pre)
    builders = {"digits_cnn": digits_cnn, "small_bn_cnn": small_bn_cnn}
    teacher = None
    if args.stage != "train":
        teacher = digits_cnn()
        fit(teacher, train, val, epochs=10, lr=2e-3, verbose=0, train_options=TrainOptions(optimizer="adam"))
    print("| stage | model | epochs | recipe | VAL accuracy mean | min | max | s/run |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models if args.stage == "train" else ["digits_cnn"]:
        for epochs in args.epochs:
            for spec in args.recipes:
                opt, lr, sched, wd = parse(spec)
                topts = TrainOptions(optimizer=opt, lr_schedule=sched, weight_decay=wd, augment="none")
                accs, t0 = [], time.time()
                for seed in args.seeds:
                    keras.utils.set_random_seed(seed)
                    if args.stage == "train":
                        model = builders[model_name]()
                        hist = fit(model, train, val, epochs=epochs, batch_size=args.batch_size, lr=lr, seed=seed,
                                   verbose=0, train_options=topts)
                        accs.append(max(hist.history["val_accuracy"]))
                    elif args.stage == "distill":
                        from kcompress.distillation.trainer import distill

                        r = distill(teacher, 0.5, train, val, DistillOptions(epochs=epochs, lr=lr), seed=seed,
                                    verbose=0, train_options=topts)
                        accs.append(r.student_accuracy)
                    elif args.stage == "structured":
                        from kcompress.pruning.structured import prune_structured

                        r = prune_structured(teacher, train, val, PruneOptions(target_flops=0.5, rounds=1,
                                                                               epochs=epochs, lr=lr),
                                             seed=seed, verbose=0, train_options=topts)
                        accs.append(r.accuracy_after)
                    elif args.stage == "magnitude":
                        import warnings

                        from kcompress.pruning.magnitude import prune_magnitude

                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            r = prune_magnitude(teacher, train, val, PruneOptions(method="magnitude", sparsity=0.8,
                                                                                  epochs=epochs, lr=lr),
                                                seed=seed, verbose=0, train_options=topts)
                        accs.append(r.accuracy_after)
                    else:
                        from kcompress.quantization.qat import qat

                        r = qat(teacher, train, val, QATOptions(epochs=epochs, lr=lr), seed=seed, ptq=False,
                                bench=False, verbose=0, log=lambda _m: None, train_options=topts)
                        accs.append(r.evaluation.accuracy)
                secs = (time.time() - t0) / len(args.seeds)
                print(f"| {args.stage} | {model_name} | {epochs} | {spec} | {100 * np.mean(accs):.2f} | "
                      f"{100 * min(accs):.2f} | {100 * max(accs):.2f} | {secs:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

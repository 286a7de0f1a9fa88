"""Benchmark: knowledge distillation on CIFAR-10 (teacher ResNet-20-style -> student of 1/2 the width).

Steps (each reuses its result from --work when present, so an interrupted run resumes):
1. decode a stratified subset of the training images (--train-size) plus a held-out VAL split (--val-size, used for
   the best epoch) and the test split (reported accuracies) into .npz files, once;
2. train the teacher (``resnet_cifar(width=16)``, 274k params), or load ``--teacher``;
3. for each seed: the student (``derive_student(teacher, 0.5)``, ~1/4 the parameters) from the same initial weights,
   trained (a) from scratch with ``train.fit`` and (b) with ``distill`` (cached teacher logits), same epochs;
4. cost: wall time per epoch (median of epochs after the first) of distillation with cached teacher logits, without
   caching (teacher on the fly; --cost-epochs epochs), and of plain student training.

Prints a Markdown table. Usage (from the repo root):

    nice -n 10 python tools/bench_distill.py --data ../shared/data/cifar10 --train-size 20000 --epochs 15 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kcompress.backend import keras  # noqa: E402
from kcompress.data import Preprocess, open_data  # noqa: E402
from kcompress.evaluation import evaluate  # noqa: E402
from kcompress.modelinfo import count_params  # noqa: E402
from kcompress.train import fit  # noqa: E402
from kcompress.zoo import resnet_cifar  # noqa: E402

PRE = Preprocess(scale=1 / 255)


def _decode(folder: str, limit_per_class=None, skip_per_class: int = 0):
    from PIL import Image

    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    xs, ys = [], []
    for i, c in enumerate(classes):
        names = sorted(os.listdir(os.path.join(folder, c)))[skip_per_class:]
        if limit_per_class is not None:
            names = names[:limit_per_class]
        for n in names:
            with Image.open(os.path.join(folder, c, n)) as im:
                xs.append(np.asarray(im.convert("RGB"), np.uint8))
            ys.append(i)
    return np.stack(xs), np.asarray(ys, np.int64), classes


def prepare(args) -> dict[str, str]:
    os.makedirs(args.work, exist_ok=True)
    per_class = args.train_size // 10
    val_per_class = args.val_size // 10
    paths = {
        "train": os.path.join(args.work, f"train{args.train_size}.npz"),
        "val": os.path.join(args.work, f"val{args.val_size}.npz"),
        "test": os.path.join(args.work, "test.npz"),
    }
    if not os.path.exists(paths["train"]):
        x, y, names = _decode(os.path.join(args.data, "train"), per_class)
        np.savez(paths["train"], x=x, y=y, class_names=np.asarray(names))
    if not os.path.exists(paths["val"]):
        # the last images of each class folder: disjoint from the training subset
        x, y, names = _decode(os.path.join(args.data, "train"), val_per_class, skip_per_class=5000 - val_per_class)
        np.savez(paths["val"], x=x, y=y, class_names=np.asarray(names))
    if not os.path.exists(paths["test"]):
        x, y, names = _decode(os.path.join(args.data, "test"))
        np.savez(paths["test"], x=x, y=y, class_names=np.asarray(names))
    return paths


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t)


def steady(seconds):
    """Median epoch time without the first epoch (graph tracing)."""
    s = seconds[1:] if len(seconds) > 1 else seconds
    return statistics.median(s)


def test_accuracy(model, test) -> float:
    return float(evaluate(model, test).accuracy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap.add_argument("--data", default=os.path.join(root, "..", "shared", "data", "cifar10"))
    ap.add_argument("--work", default="/tmp/kc_bench_distill", help="cache folder (decoded data, models, results)")
    ap.add_argument("--teacher", default=None, help="a trained teacher model to load instead of training one")
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--cost-epochs", type=int, default=3, help="epochs of the uncached run (cost only)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-teacher-accuracy", type=float, default=None, help="(for smoke runs with a weak teacher)")
    ap.add_argument("--stage", choices=["all", "teacher"], default="all")
    args = ap.parse_args()
    t_start = time.perf_counter()

    paths = prepare(args)
    train = open_data(paths["train"], PRE)
    val = open_data(paths["val"], PRE)
    test = open_data(paths["test"], PRE)
    results_path = os.path.join(args.work, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def save_results():
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)

    teacher_path = args.teacher or os.path.join(args.work, f"teacher_e{args.teacher_epochs}.keras")
    if os.path.exists(teacher_path):
        teacher = keras.models.load_model(teacher_path)
    else:
        teacher = resnet_cifar(width=16)
        timer = EpochTimer()
        fit(teacher, train, val, epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr, seed=0,
            verbose=2, callbacks=[timer])
        teacher.save(teacher_path)
        results["teacher_epoch_seconds"] = steady(timer.seconds)
    if "teacher_test" not in results:
        results["teacher_test"] = test_accuracy(teacher, test)
        save_results()
    print(f"teacher: {count_params(teacher)['total']} params, test accuracy {results['teacher_test']:.4f}", flush=True)
    if args.stage == "teacher":
        return

    from kcompress.distillation.students import derive_student
    from kcompress.distillation.trainer import distill
    from kcompress.options import DistillOptions

    key = f"e{args.epochs}_w{args.width}_T{args.temperature}_a{args.alpha}_{args.schedule}"
    runs = results.setdefault(key, {})
    for seed in [int(s) for s in args.seeds.split(",")]:
        keras.utils.set_random_seed(seed)
        init = derive_student(teacher, args.width)
        init_weights = init.get_weights()
        results["student_params"] = count_params(init)["total"]
        if f"scratch{seed}" not in runs:
            student = keras.models.clone_model(init)
            student.set_weights(init_weights)
            timer = EpochTimer()
            fit(student, train, val, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                verbose=2, callbacks=[timer])
            runs[f"scratch{seed}"] = {"test": test_accuracy(student, test), "epoch_seconds": timer.seconds}
            save_results()
        if f"distill{seed}" not in runs:
            student = keras.models.clone_model(init)
            student.set_weights(init_weights)
            opts = DistillOptions(temperature=args.temperature, alpha=args.alpha, temperature_schedule=args.schedule or "constant",
                                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  min_teacher_accuracy=args.min_teacher_accuracy)
            res = distill(teacher, student, train, val, opts, seed=seed, verbose=2)
            runs[f"distill{seed}"] = {"test": test_accuracy(res.student, test),
                                      "epoch_seconds": [h["seconds"] for h in res.history],
                                      "cache_seconds": res.cache_seconds, "best_epoch": res.best_epoch}
            save_results()
        print(f"seed {seed}: scratch {runs[f'scratch{seed}']['test']:.4f} distilled {runs[f'distill{seed}']['test']:.4f}",
              flush=True)
    if "uncached" not in runs:
        student = keras.models.clone_model(init)
        student.set_weights(init_weights)
        opts = DistillOptions(temperature=args.temperature, alpha=args.alpha, temperature_schedule=args.schedule or "constant",
                              epochs=args.cost_epochs, batch_size=args.batch_size, lr=args.lr,
                              cache_teacher="off", min_teacher_accuracy=args.min_teacher_accuracy)
        res = distill(teacher, student, train, val, opts, seed=0, verbose=2)
        runs["uncached"] = {"epoch_seconds": [h["seconds"] for h in res.history]}
        save_results()

    seeds = [int(s) for s in args.seeds.split(",")]
    teacher_acc = results["teacher_test"]
    scratch = [runs[f"scratch{s}"]["test"] for s in seeds]
    dist = [runs[f"distill{s}"]["test"] for s in seeds]
    gaps = [(d - s) / (teacher_acc - s) if teacher_acc > s else float("nan") for s, d in zip(scratch, dist)]
    plain_s = statistics.mean(steady(runs[f"scratch{s}"]["epoch_seconds"]) for s in seeds)
    cached_s = statistics.mean(steady(runs[f"distill{s}"]["epoch_seconds"]) for s in seeds)
    uncached_s = steady(runs["uncached"]["epoch_seconds"])
    cache_s = statistics.mean(runs[f"distill{s}"]["cache_seconds"] for s in seeds)

    def ms(v):
        return f"{100 * statistics.mean(v):.2f}% ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.2f}"

    print()
    print(f"CIFAR-10, {args.train_size} training images, {args.epochs} epochs, seeds {args.seeds}, "
          f"T={args.temperature}, alpha={args.alpha}, schedule {args.schedule}, batch {args.batch_size}; "
          f"accuracy on the {test.num_samples} test images (best epoch by {val.num_samples} VAL images held out of train)")
    print()
    print("| model | params | test accuracy (mean ± sd) | per seed |")
    print("|---|---|---|---|")
    print(f"| teacher resnet_cifar(16) | {count_params(teacher)['total']:,} | {100 * teacher_acc:.2f}% | - |")
    print(f"| student x{args.width} from scratch | {results['student_params']:,} | {ms(scratch)} | "
          + ", ".join(f"{100 * a:.2f}" for a in scratch) + " |")
    print(f"| student x{args.width} distilled | {results['student_params']:,} | {ms(dist)} | "
          + ", ".join(f"{100 * a:.2f}" for a in dist) + " |")
    print()
    print(f"Gap recovered: {100 * statistics.mean(gaps):.0f}% on average (per seed: "
          + ", ".join(f"{100 * g:.0f}%" for g in gaps) + "; goal >= 50%)")
    print()
    print("| epoch cost (median of epochs 2+) | seconds | vs plain |")
    print("|---|---|---|")
    print(f"| plain student (train.fit) | {plain_s:.1f} | 1.00x |")
    print(f"| distill, cached teacher logits | {cached_s:.1f} | {cached_s / plain_s:.2f}x |")
    print(f"| distill, teacher on the fly | {uncached_s:.1f} | {uncached_s / plain_s:.2f}x |")
    print(f"| one-time teacher pass for the cache | {cache_s:.1f} | - |")
    print()
    print(f"wall time of this invocation: {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()

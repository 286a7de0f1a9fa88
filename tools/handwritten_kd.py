#!/usr/bin/env python
"""The hand-written reference of issue 13's distillation row: what a competent engineer writes with tf_keras alone.

A fresh half-width ResNet-20-style student (``zoo.resnet_cifar(width=8)``, 69,570 params), KD T=4 alpha 0.5 with the
teacher run on the same augmented batch (flip + reflect-pad-4 crop), SGD Nesterov 0.9, cosine from 0.1, L2 5e-4 on
kernels as ``5e-4 * tf.nn.l2_loss`` (gradient ``5e-4 * w``: half of tf_keras's ``l2(5e-4)`` regularizer, whose
gradient is ``1e-3 * w``; ``--l2 1e-3`` for that), batch 128, best epoch by VAL accuracy, reported on TEST. Only the
splits come from kcompress (the same stratified 20k TRAIN / 10% VAL / 10k TEST as ``tools/bench_recipe_distill.py``);
the training is plain tf_keras.

    nice python tools/handwritten_kd.py --teacher runs/teacher/01-baseline/model.keras \\
        --data ../shared/data/cifar10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cifar_splits import add_arguments, open_splits  # noqa: E402

import kcompress as kc  # noqa: E402
from kcompress.backend import keras, tf  # noqa: E402
from kcompress.zoo import resnet_cifar  # noqa: E402


def arrays(source):
    xs, ys = zip(*source.numpy_batches((32, 32, 3), batch_size=1000))
    return np.concatenate(xs), np.concatenate(ys)


def augment(x):
    x = tf.image.random_flip_left_right(x)
    x = tf.pad(x, [[0, 0], [4, 4], [4, 4], [0, 0]], mode="REFLECT")
    return tf.image.random_crop(x, tf.stack([tf.shape(x)[0], 32, 32, 3]))


def run(teacher, train, val, test, seed, epochs, T=4.0, alpha=0.5, batch=128, lr=0.1, l2=5e-4):
    keras.utils.set_random_seed(seed)
    student = resnet_cifar(width=8, name="student")
    (x, y), steps = train, -(-len(train[0]) // batch)
    opt = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr, epochs * steps), momentum=0.9, nesterov=True)
    kernels = [v for v in student.trainable_variables if "kernel" in v.name]
    kl = keras.losses.KLDivergence()

    @tf.function
    def step(xb, yb):
        xb = augment(xb)
        t_logits = tf.math.log(teacher(xb, training=False) + 1e-8)  # the teacher ends in softmax
        with tf.GradientTape() as tape:
            s_prob = student(xb, training=True)
            s_logits = tf.math.log(s_prob + 1e-8)
            ce = keras.losses.sparse_categorical_crossentropy(yb, s_prob)
            soft = kl(tf.nn.softmax(t_logits / T), tf.nn.softmax(s_logits / T)) * T * T
            loss = alpha * tf.reduce_mean(ce) + (1 - alpha) * soft + l2 * tf.add_n([tf.nn.l2_loss(k) for k in kernels])
        opt.apply_gradients(zip(tape.gradient(loss, student.trainable_variables), student.trainable_variables))

    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).batch(batch)
    best, best_w = -1.0, None
    for epoch in range(epochs):
        for xb, yb in ds:
            step(xb, yb)
        acc = float(np.mean(student.predict(val[0], batch_size=500, verbose=0).argmax(-1) == val[1]))
        print(f"seed {seed} epoch {epoch + 1}: VAL {100 * acc:.2f}%", flush=True)
        if acc > best:
            best, best_w = acc, student.get_weights()
    student.set_weights(best_w)
    return best, float(np.mean(student.predict(test[0], batch_size=500, verbose=0).argmax(-1) == test[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--l2", type=float, default=5e-4, help="coefficient of tf.nn.l2_loss (gradient l2 * w)")
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args()
    splits = open_splits(args)
    train, val, test = arrays(splits.train), arrays(splits.val), arrays(splits.test)
    teacher = kc.load_model(args.teacher)
    teacher.trainable = False
    t_test = float(np.mean(teacher.predict(test[0], batch_size=500, verbose=0).argmax(-1) == test[1]))
    rows = []
    for seed in args.seeds:
        v, t = run(teacher, train, val, test, seed, args.epochs, l2=args.l2)
        rows.append({"seed": seed, "l2": args.l2, "val": v, "test": t, "teacher_test": t_test})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("hand-written KD x0.5: TEST " + ", ".join(f"{100 * r['test']:.2f}%" for r in rows)
          + f", mean {100 * np.mean([r['test'] for r in rows]):.2f}% (teacher {100 * t_test:.2f}%)")


if __name__ == "__main__":
    main()

"""BatchNorm recalibration (AdaBN) against numpy, and the short-distillation collapse it fixes."""

import numpy as np
import pytest

from kcompress.backend import keras
from kcompress.batchnorm import batchnorm_layers, recalibrate_batchnorm
from kcompress.data import Preprocess, open_data
from kcompress.evaluation import evaluate

L = keras.layers


def test_recalibrated_statistics_are_the_data_mean_and_variance(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (512, 6)).astype(np.float32)
    path = str(tmp_path / "d.npz")
    np.savez(path, x=x, y=rng.integers(0, 2, 512))
    data = open_data(path)
    inp = L.Input((6,))
    dense = L.Dense(4, name="hidden")
    bn = L.BatchNormalization(name="bn")
    model = keras.Model(inp, L.Dense(2)(bn(dense(inp))))
    inner = keras.Model(inp, dense(inp))
    assert recalibrate_batchnorm(model, data, samples=512, batch_size=128) == 1
    h = inner(x).numpy()
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(axis=0), rtol=1e-4, atol=1e-4)
    # the mean of four batches' variances: close to the whole sample's (batch means differ a little)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(axis=0), rtol=0.1)
    assert bn.momentum == 0.99  # restored


def test_nested_and_frozen_batchnorm_layers_are_recalibrated_and_stay_frozen(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, (256, 4)).astype(np.float32)
    path = str(tmp_path / "d.npz")
    np.savez(path, x=x, y=rng.integers(0, 2, 256))
    inner_in = L.Input((4,))
    inner = keras.Model(inner_in, L.BatchNormalization(name="inner_bn")(inner_in), name="backbone")
    inp = L.Input((4,))
    model = keras.Model(inp, L.BatchNormalization(name="outer_bn")(inner(inp)))
    inner.trainable = False  # a frozen backbone, as in transfer learning
    assert {b.name for b in batchnorm_layers(model)} == {"inner_bn", "outer_bn"}
    assert recalibrate_batchnorm(model, open_data(path), samples=256, batch_size=64) == 2
    # the frozen backbone's BN now holds the data's statistics (not the initial 0 / 1) and is still frozen
    np.testing.assert_allclose(inner.layers[1].moving_mean.numpy(), x.mean(axis=0), rtol=1e-4)
    assert not inner.layers[1].trainable and not inner.trainable


def _bn_cnn(width=32):
    """A small CNN with BatchNorm at Keras's default momentum (0.99): its moving statistics need ~100s of steps."""
    inp = L.Input((8, 8, 1))
    x = L.Conv2D(width, 3, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(2 * width, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(x))


@pytest.fixture(scope="module")
def bn_teacher():
    from kcompress.train import fit

    pre = Preprocess(scale=1 / 255)
    train, val = open_data("digits:train", pre), open_data("digits:val", pre)
    teacher = _bn_cnn()
    fit(teacher, train, val, epochs=12, lr=3e-3, verbose=0)
    return teacher, train, val


def test_short_distillation_of_a_batchnorm_student_ends_near_the_teacher(bn_teacher):
    from kcompress.distillation.trainer import distill
    from kcompress.options import DistillOptions

    teacher, train, val = bn_teacher
    t_acc = evaluate(teacher, val).accuracy
    assert t_acc > 0.85
    r = distill(teacher, 0.5, train, val, DistillOptions(epochs=12, lr=3e-3), verbose=0)
    s_acc = evaluate(r.student, val).accuracy
    assert s_acc >= t_acc - 0.05, (t_acc, s_acc, [h.get("val_accuracy") for h in r.history])
    # the cause, shown on the student: moving statistics that describe an untrained network (as after a few
    # hundred steps at momentum 0.99) collapse VAL accuracy; re-estimating them from training data restores it
    for bn in batchnorm_layers(r.student):
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, np.float32))
        bn.moving_variance.assign(np.ones(bn.moving_variance.shape, np.float32))
    stale = evaluate(r.student, val).accuracy
    recalibrate_batchnorm(r.student, train)
    assert stale < s_acc - 0.2 and evaluate(r.student, val).accuracy >= s_acc - 0.02, (stale, s_acc)

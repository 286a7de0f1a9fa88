"""Distillation: loss against a numpy reference, Distiller invariants, width-derived students, cache, resume, CLI."""

import os

import numpy as np
import pytest
from click.testing import CliRunner

from kcompress.backend import keras, tf
from kcompress.cli import main
from kcompress.data import Preprocess
from kcompress.distillation.loss import Distiller, TemperatureSchedule, distillation_loss
from kcompress.distillation.students import derive_student, scaled_layers
from kcompress.distillation.trainer import cache_teacher_outputs, check_teacher, distill
from kcompress.errors import KcompressError, UsageError
from kcompress.io import save_model
from kcompress.modelinfo import count_params
from kcompress.options import DistillOptions
from kcompress.train import fit
from kcompress.zoo import digits_cnn, resnet_cifar

PRE = Preprocess(scale=1 / 255)
L = keras.layers


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_reference(y, s, t, T, alpha):
    ce = -np.mean(_np_log_softmax(s)[np.arange(len(y)), y])
    lpt, lps = _np_log_softmax(t / T), _np_log_softmax(s / T)
    kl = np.mean(np.sum(np.exp(lpt) * (lpt - lps), -1))
    return ce, kl, alpha * ce + (1 - alpha) * T**2 * kl


@pytest.fixture(scope="module")
def fixed_logits():
    rng = np.random.default_rng(0)
    return rng.integers(0, 5, 16), (3 * rng.normal(size=(16, 5))).astype(np.float32), (
        3 * rng.normal(size=(16, 5))
    ).astype(np.float32)


@pytest.fixture(scope="module")
def teacher(digits):
    model = digits_cnn(width=16)
    fit(model, *digits, epochs=8, lr=3e-3, seed=0, verbose=0)
    return model


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_loss_matches_numpy_reference_and_kl_scales_with_t_squared(fixed_logits, T):
    y, s, t = fixed_logits
    ce, kl, total = (float(v) for v in distillation_loss(y, s, t, T, 0.3))
    ref_ce, ref_kl, ref_total = _np_reference(y, s, t, T, 0.3)
    assert ce == pytest.approx(ref_ce, rel=1e-5)
    assert kl == pytest.approx(ref_kl, rel=1e-4)
    assert total == pytest.approx(ref_total, rel=1e-4)
    _, _, kl_only = distillation_loss(y, s, t, T, 0.0)
    assert float(kl_only) == pytest.approx(T**2 * ref_kl, rel=1e-4)


def test_alpha_one_is_the_plain_student_cross_entropy(fixed_logits):
    y, s, t = fixed_logits
    _, _, total = distillation_loss(y, s, t, 4.0, 1.0)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, s)
    assert float(total) == pytest.approx(float(plain), rel=1e-6)
    probs = tf.nn.softmax(s)
    _, _, total_p = distillation_loss(y, probs, t, 4.0, 1.0, student_probabilities=True)
    assert float(total_p) == pytest.approx(float(keras.losses.SparseCategoricalCrossentropy()(y, probs)), rel=1e-6)


def test_softmax_outputs_give_the_same_soft_targets_as_logits(fixed_logits):
    y, s, t = fixed_logits
    ref = distillation_loss(y, s, t, 4.0, 0.5)
    via_log_probs = distillation_loss(y, tf.nn.softmax(s), tf.nn.log_softmax(t), 4.0, 0.5, student_probabilities=True)
    for a, b in zip(ref, via_log_probs):
        assert float(a) == pytest.approx(float(b), rel=1e-4)


def test_temperature_schedules():
    lin = TemperatureSchedule.parse("linear:8:2")
    assert [lin(e, 4) for e in range(4)] == pytest.approx([8, 6, 4, 2])
    cos = TemperatureSchedule.parse("cosine:8:2")
    assert cos(0, 5) == pytest.approx(8) and cos(2, 5) == pytest.approx(5) and cos(4, 5) == pytest.approx(2)
    assert TemperatureSchedule.parse(None, 3.0)(7, 10) == 3.0
    for bad in ("linear:8", "step:8:2", "linear:a:2", "cosine:0:2"):
        with pytest.raises(UsageError):
            TemperatureSchedule.parse(bad)


def test_only_student_trains_and_teacher_is_bit_identical(teacher, digits):
    train, _ = digits
    before = [w.copy() for w in teacher.get_weights()]  # includes BatchNorm moving statistics
    student = derive_student(teacher, 0.5)
    distiller = Distiller(student, teacher)
    assert {v.ref() for v in distiller.trainable_variables} == {v.ref() for v in student.trainable_variables}
    x, y = next(iter(train.dataset((8, 8, 1), batch_size=32)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(teacher.weights)
        t = distiller._unpack((x, y))[2]
        _, _, loss = distillation_loss(y, student(x, training=True), t, 4.0, 0.5, True)
    assert all(g is None for g in tape.gradient(loss, teacher.weights))
    assert all(g is not None for g in tape.gradient(loss, student.trainable_variables))
    s_before = [w.copy() for w in student.get_weights()]
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    distiller.fit(train.dataset((8, 8, 1), batch_size=64), epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights()))
    assert any(not np.array_equal(a, b) for a, b in zip(s_before, student.get_weights()))
    teacher.trainable = True  # the Distiller froze the module-scoped teacher; kc.distill gives it back itself


def test_distill_keeps_best_epoch_and_saved_student_loads_with_plain_tf_keras(teacher, digits, tmp_path):
    train, val = digits
    teacher.trainable = True  # the caller's flag, whatever an earlier test left on the module-scoped teacher
    result = distill(teacher, 0.5, train, val, DistillOptions(epochs=3), verbose=0)
    assert result.cache == "memory" and len(result.history) == 3
    assert teacher.trainable  # frozen only while the student trained; the caller's model is given back as it was
    assert result.student_params < result.teacher_params / 2
    assert result.teacher_accuracy > 0.8
    best = result.history[result.best_epoch - 1]
    assert best["val_accuracy"] == max(h["val_accuracy"] for h in result.history)
    assert {"loss", "student_ce", "distill_kl", "accuracy", "val_accuracy", "temperature"} <= set(best)
    path = str(tmp_path / "student.keras")
    save_model(result.student, path)
    loaded = keras.models.load_model(path)
    x = np.concatenate([b[0] for b in val.numpy_batches((8, 8, 1), batch_size=512)])
    y = val.labels
    pred = loaded.predict(x, verbose=0)
    assert pred.shape == (len(y), 10)
    np.testing.assert_allclose(pred, result.student.predict(x, verbose=0), atol=1e-6)
    assert float(np.mean(pred.argmax(-1) == y)) == pytest.approx(result.student_accuracy, abs=1e-6)


def test_cached_teacher_outputs_follow_the_training_order(teacher, digits, tmp_path):
    train, _ = digits
    logits, where = cache_teacher_outputs(teacher, train, 64, seed=3, where="disk", cache_dir=str(tmp_path))
    assert where == "disk" and isinstance(logits, np.memmap) and os.path.exists(tmp_path / "teacher_logits.npy")
    x = np.concatenate([b[0] for b in train.dataset((8, 8, 1), 64, shuffle=True, seed=3).as_numpy_iterator()])
    expect = np.log(np.maximum(teacher.predict(x, verbose=0), 1e-30))
    np.testing.assert_allclose(logits, expect, atol=1e-4)


def test_weak_teacher_is_refused(digits):
    _, val = digits
    with pytest.raises(KcompressError, match="chance"):
        check_teacher(digits_cnn(width=4), val)
    with pytest.raises(KcompressError, match="min-teacher-accuracy"):
        check_teacher(digits_cnn(width=4), val, min_accuracy=0.99)


def test_early_stopping_and_resume(teacher, digits, tmp_path):
    train, val = digits
    flat = keras.Sequential([L.Input((8, 8, 1)), L.Flatten(), L.Dense(16, activation="relu"), L.Dense(10)])
    # lr so small that VAL accuracy cannot improve after the first epoch: patience 1 stops at epoch 2
    stop = distill(teacher, flat, train, val, DistillOptions(epochs=5, lr=1e-12, patience=1), verbose=0)
    assert [h["epoch"] for h in stop.history] == [1, 2] and stop.best_epoch == 1
    ckpt = str(tmp_path / "ckpt")
    first = distill(teacher, 0.5, train, val, DistillOptions(epochs=2), verbose=0, checkpoint_dir=ckpt)
    with pytest.raises(KcompressError, match="--resume"):
        distill(teacher, 0.5, train, val, DistillOptions(epochs=3), verbose=0, checkpoint_dir=ckpt)
    with pytest.raises(KcompressError, match="settings differ"):
        distill(teacher, 0.5, train, val, DistillOptions(epochs=3, alpha=0.9), verbose=0, checkpoint_dir=ckpt,
                resume=True)
    # nothing left to train: the student comes back from the checkpoint with exactly the first run's best weights
    # (a freshly derived student would not; its initial weights differ)
    same = distill(teacher, 0.5, train, val, DistillOptions(epochs=2), verbose=0, checkpoint_dir=ckpt, resume=True)
    fresh = distill(teacher, 0.5, train, val, DistillOptions(epochs=1, lr=1e-12), verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(same.student.get_weights(), first.student.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.student.get_weights(), first.student.get_weights()))
    resumed = distill(teacher, 0.5, train, val, DistillOptions(epochs=3), verbose=0, checkpoint_dir=ckpt, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history
    assert resumed.history[2]["accuracy"] > first.history[0]["accuracy"]  # it kept training from epoch 2


def _train_one_step(model):
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy())
    x = np.random.default_rng(0).random((4, *model.input_shape[1:]), np.float32)
    before = model.trainable_weights[0].numpy().copy()
    loss = model.train_on_batch(x, np.arange(4))
    assert np.isfinite(loss) and not np.array_equal(before, model.trainable_weights[0].numpy())


def test_teacher_initialised_student_keeps_the_largest_l1_channels_and_starts_near_the_teacher(teacher, digits):
    """student_init teacher: the sliced student has the derived student's architecture, its first conv holds the
    teacher's kernels of largest L1 norm (numpy reference), and one epoch of distillation leaves it near the teacher,
    far above a fresh student after the same epoch."""
    from kcompress.distillation.students import sliced_student
    from kcompress.evaluation import evaluate

    train, val = digits
    sliced = sliced_student(teacher, 0.5)
    assert count_params(sliced)["total"] == count_params(derive_student(teacher, 0.5))["total"]
    conv = next(la for la in teacher.layers if isinstance(la, keras.layers.Conv2D))
    k = conv.kernel.numpy()
    kept = sliced.get_layer(conv.name).filters
    order = np.sort(np.argsort(np.abs(k).sum(axis=(0, 1, 2)))[-kept:])
    np.testing.assert_array_equal(sliced.get_layer(conv.name).kernel.numpy(), k[..., order])
    assert all(layer.trainable for layer in sliced.layers)
    teacher_acc = evaluate(teacher, val).accuracy
    # before any training; over 5 teacher seeds the sliced student scored 0.50-0.88, a fresh one 0.06-0.09 (chance)
    fresh_acc = evaluate(derive_student(teacher, 0.5), val).accuracy
    assert evaluate(sliced, val).accuracy > max(0.3, fresh_acc + 0.2)
    sliced_run = distill(teacher, 0.5, train, val, DistillOptions(epochs=1, student_init="teacher"), verbose=0)
    fresh_run = distill(teacher, 0.5, train, val, DistillOptions(epochs=1, student_init="scratch"), verbose=0)
    assert sliced_run.student_accuracy >= teacher_acc - 0.05
    assert sliced_run.student_accuracy > fresh_run.student_accuracy + 0.1


def test_student_init_auto_falls_back_to_fresh_weights_where_no_channel_can_be_cut_and_teacher_says_why():
    """A channel softmax makes the only conv a structured-pruning barrier: ``auto`` derives a fresh student (and says
    so), ``teacher`` is an error naming the way out, ``scratch`` never looks."""
    from kcompress.distillation.students import make_student
    from kcompress.errors import KcompressError

    inp = keras.layers.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inp)
    x = keras.layers.Activation("softmax")(x)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    teacher = keras.Model(inp, out)
    said = []
    student = make_student(teacher, 0.5, "auto", log=said.append)
    assert student.get_layer("conv").filters == 8
    assert any("freshly initialised (student_init auto: the teacher has no channel group" in m for m in said)
    with pytest.raises(KcompressError, match="--student-init teacher: .*use --student-init scratch"):
        make_student(teacher, 0.5, "teacher")
    assert make_student(teacher, 0.5, "scratch").get_layer("conv").filters == 8


def test_derived_residual_student_has_the_narrow_architecture_and_trains():
    teacher = resnet_cifar((16, 16, 3), width=16)
    teacher.trainable = False  # a frozen teacher must still give a trainable student
    student = derive_student(teacher, 0.5)
    assert count_params(student)["total"] == count_params(resnet_cifar((16, 16, 3), width=8))["total"]
    assert student.output_shape == (None, 10)
    _train_one_step(student)


@pytest.fixture(scope="module")
def mobilenet_pair():
    teacher = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10)
    return teacher, derive_student(teacher, 0.5)


def test_derived_mobilenetv2_student(mobilenet_pair):
    teacher, student = mobilenet_pair
    assert student.output_shape == (None, 10)
    widths = {lyr.name: lyr.filters for lyr in student.layers if isinstance(lyr, L.Conv2D)
              and not isinstance(lyr, L.DepthwiseConv2D)}
    for lyr in teacher.layers:
        if lyr.name in widths:
            assert widths[lyr.name] == round(lyr.filters * 0.5), lyr.name
    ratio = count_params(student)["total"] / count_params(teacher)["total"]
    assert 0.2 < ratio < 0.35


@pytest.mark.slow
def test_derived_mobilenetv2_student_trains(mobilenet_pair):
    _train_one_step(mobilenet_pair[1])


def test_width_derivation_keeps_classifier_input_skips_and_scales_concatenate():
    inp = L.Input((8, 8, 3))
    a = L.Conv2D(3, 3, padding="same", name="to_input_add")(inp)
    x = L.Add(name="skip")([inp, a])  # joined with the model input: must keep 3 channels
    b = L.Conv2D(8, 1, name="branch_b")(x)
    c = L.Conv2D(16, 1, name="branch_c")(x)
    x = L.Concatenate(name="cat")([b, c])
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(32, activation="relu", name="hidden")(x)
    out = L.Dense(7, name="classifier")(x)
    model = keras.Model(inp, out)
    assert scaled_layers(model) == {"to_input_add": False, "branch_b": True, "branch_c": True, "hidden": True,
                                    "classifier": False}
    student = derive_student(model, 0.5)
    assert [student.get_layer(n).output_shape[-1] for n in ("to_input_add", "cat", "hidden", "classifier")] == [
        3, 12, 16, 7]
    seq = keras.Sequential([L.Input((8, 8, 1)), L.Conv2D(16, 3), L.Flatten(), L.Dense(32), L.Dense(10)])
    assert [lyr.output_shape[-1] for lyr in derive_student(seq, 0.25).layers] == [4, 144, 8, 10]
    with pytest.raises(UsageError):
        derive_student(seq, 1.5)


# ----------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def teacher_file(teacher, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.keras")
    save_model(teacher, path)
    return path


def _run(*args):
    return CliRunner().invoke(main, ["distill", *args])


def test_cli_distills_end_to_end(teacher_file, tmp_path):
    out = str(tmp_path / "student.keras")
    args = ["--teacher", teacher_file, "--data", "digits:train", "--val-data", "digits:val", "--scale", "0.00392157",
            "--student-width", "0.5", "--epochs", "2", "--temperature-schedule", "linear:6:2", "-o", out]
    r = _run(*args, "--max-drop", "50")
    assert r.exit_code == 0, r.output
    assert "teacher: " in r.output and "student: " in r.output and f"Wrote {out}" in r.output
    assert "best epoch" in r.output
    assert keras.models.load_model(out).output_shape == (None, 10)
    assert not os.path.exists(out + ".ckpt")
    again = _run(*args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert "initialised from the teacher's largest-L1 channels (student_init auto)" in r.output
    # two epochs from fresh weights leave the student far below the teacher: the default --max-drop 3 makes it an
    # error, and the student is kept under a name that says so, next to (not over) the passing one
    before = os.path.getmtime(out)
    gated = _run(*args, "--overwrite", "--student-init", "scratch")
    failed = out.replace(".keras", ".FAILED.keras")
    assert gated.exit_code == 1 and "points below the teacher on VAL, more than --max-drop 3.0" in gated.output
    assert f"kept as {failed}" in gated.output and os.path.getmtime(out) == before
    assert keras.models.load_model(failed).output_shape == (None, 10)


def test_cli_rejects_mismatched_students_and_bad_usage(teacher_file, tmp_path):
    five = keras.Sequential([L.Input((8, 8, 1)), L.Flatten(), L.Dense(5, activation="softmax")])
    rgb = keras.Sequential([L.Input((8, 8, 3)), L.Flatten(), L.Dense(10, activation="softmax")])
    for model, message in ((five, "different numbers of classes: teacher 10, student 5"),
                           (rgb, "different inputs")):
        path = str(tmp_path / f"{model.name}.keras")
        save_model(model, path)
        r = _run("--teacher", teacher_file, "--data", "digits:train", "--student", path, "-o",
                 str(tmp_path / "s.keras"))
        assert r.exit_code == 1 and message in r.output, r.output
    width = _run("--teacher", teacher_file, "--data", "digits", "--student-width", "1.5")
    assert width.exit_code == 2 and "--student-width: must be between 0 and 1" in width.output
    bad = _run("--teacher", teacher_file, "--data", "digits", "--student-width", "0.5", "--temperature-schedule",
               "linear:8")
    assert bad.exit_code == 2 and "temperature-schedule" in bad.output
    weak = _run("--teacher", teacher_file, "--data", "digits:train", "--student-width", "0.5",
                "--min-teacher-accuracy", "0.999", "-o", str(tmp_path / "w.keras"))
    assert weak.exit_code == 1 and "student would inherit" in weak.output


def test_cli_help_has_an_example():
    r = _run("--help")
    assert r.exit_code == 0 and "--student-width" in r.output and "kcompress distill --teacher" in r.output


def test_size_warnings():
    from kcompress.distillation.trainer import size_warnings

    assert "little compression" in size_warnings(1000, 600)[0]
    assert "accuracy floor" in size_warnings(1000, 30)[0]
    assert size_warnings(1000, 250) == []

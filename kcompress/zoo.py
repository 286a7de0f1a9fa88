"""Model builders for the demo, the tests and the benchmarks (tf_keras, freshly initialised, no downloads).

- :func:`digits_cnn`: the demo's CNN for 8x8x1 digits (about 150k parameters, so int8 size ratios are meaningful);
- :func:`resnet_cifar`: a ResNet-20-style net (3 stages of residual blocks with ``Add``), 274k params at width 16;
- :func:`mobilenetv2`: ``tf_keras.applications.MobileNetV2(weights=None)`` for small inputs, with BatchNorm
  momentum suited to short trainings from scratch.
"""

from __future__ import annotations

from kcompress.backend import keras

__all__ = ["digits_cnn", "resnet_cifar", "mobilenetv2"]

L = keras.layers


def digits_cnn(input_shape=(8, 8, 1), num_classes: int = 10, width: int = 32, name: str = "digits_cnn"):
    """Conv-BN-ReLU x2, max-pool, Dense(4*width), softmax. Expects pixels scaled to about 0-1.

    BatchNorm momentum is 0.9: digits gives about 23 steps an epoch, too few for the default 0.99 moving averages
    to settle, and validation accuracy then swings by several points from run to run.
    """
    inp = L.Input(input_shape, name="image")
    x = L.Conv2D(width, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(2 * width, 3, padding="same", use_bias=False, name="conv2")(x)
    x = L.BatchNormalization(momentum=0.9, name="bn2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(4 * width, activation="relu", name="fc1")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inp, out, name=name)


def resnet_cifar(
    input_shape=(32, 32, 3), num_classes: int = 10, width: int = 16, blocks_per_stage: int = 3, name: str = "resnet"
):
    """ResNet-20 layout (He et al. 2016, CIFAR variant) with projection shortcuts where shapes change."""
    inp = L.Input(input_shape, name="image")
    x = L.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            p = f"s{stage}b{block}_"
            y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=p + "conv1")(x)
            y = L.BatchNormalization(name=p + "bn1")(y)
            y = L.ReLU(name=p + "relu1")(y)
            y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=p + "conv2")(y)
            y = L.BatchNormalization(name=p + "bn2")(y)
            if stride != 1 or x.shape[-1] != filters:
                x = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=p + "proj")(x)
                x = L.BatchNormalization(name=p + "proj_bn")(x)
            x = L.Add(name=p + "add")([x, y])
            x = L.ReLU(name=p + "relu2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inp, out, name=name)


def mobilenetv2(
    input_shape=(32, 32, 3), num_classes: int = 10, alpha: float = 1.0, bn_momentum: float = 0.9,
    name: str = "mobilenetv2",
):
    """tf_keras.applications.MobileNetV2 with ``weights=None`` and a fresh softmax classifier.

    Gotcha: the application's BatchNorm momentum is 0.999, tuned for ImageNet-length training; trained from
    scratch for a few epochs its moving statistics stay near their initial values and validation accuracy sits at
    chance (measured here on CIFAR-10: 10% after 11 epochs at 44% training accuracy). ``bn_momentum`` rebuilds
    the same architecture with a faster-moving average (0.9 by default; None keeps 0.999).
    """
    model = keras.applications.MobileNetV2(
        input_shape=input_shape, alpha=alpha, weights=None, classes=num_classes, include_top=True
    )
    if bn_momentum is None:
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "BatchNormalization":
            layer["config"]["momentum"] = bn_momentum
    config["name"] = name
    return keras.Model.from_config(config)

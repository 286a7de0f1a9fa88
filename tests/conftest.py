"""Shared fixtures: one digits CNN trained once per session, real data from scikit-learn."""


import hashlib
import os

import numpy as np
import pytest

from kcompress.backend import keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TF)


@pytest.fixture(scope="session")
def digits_pre():
    from kcompress.data import Preprocess

    return Preprocess(scale=1 / 255)


@pytest.fixture(scope="session")
def digits_train(digits_pre):
    from kcompress.data import open_data

    return open_data("digits:train", digits_pre)


@pytest.fixture(scope="session")
def digits_val(digits_pre):
    from kcompress.data import open_data

    return open_data("digits:val", digits_pre)


@pytest.fixture(scope="session")
def digits(digits_train, digits_val):
    """(digits:train, digits:val), pixels scaled to 0-1."""
    return digits_train, digits_val


@pytest.fixture(scope="session")
def trained_cnn(digits_train, digits_val):
    """digits_cnn trained for 10 epochs (about 96% on digits:val)."""
    from kcompress.train import fit
    from kcompress.zoo import digits_cnn

    model = digits_cnn()
    fit(model, digits_train, digits_val, epochs=10, lr=2e-3, verbose=0)
    return model


@pytest.fixture(scope="session")
def cnn_path(trained_cnn, tmp_path_factory):
    from kcompress.io import save_model

    path = str(tmp_path_factory.mktemp("models") / "cnn.keras")
    save_model(trained_cnn, path)
    return path


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
    """digits:val as an .npz of raw 0-255 pixels (what a user would save)."""
    from sklearn.datasets import load_digits

    from kcompress.data import open_data

    val = open_data("digits:val")
    xs = np.concatenate([x for x, _ in val.numpy_batches((8, 8, 1), 512)])
    path = str(tmp_path_factory.mktemp("data") / "digits_val.npz")
    np.savez(path, x=xs, y=val.labels)
    assert load_digits is not None
    return path


@pytest.fixture(scope="session")
def digits32_npz(tmp_path_factory):
    """256 real digits upsampled to 32x32x3 as an .npz of 0-255 pixels (for applications models that need larger
    inputs); open it with the preprocessing the test needs."""
    from kcompress.data import open_data

    src = open_data("digits")
    x = np.concatenate([b for b, _ in src.numpy_batches((8, 8, 1), batch_size=256)])[:256]
    x = np.repeat(np.kron(x, np.ones((1, 4, 4, 1), np.float32)), 3, axis=-1)
    path = tmp_path_factory.mktemp("d32") / "d32.npz"
    np.savez(path, x=x, y=src.labels[:256])
    return str(path)


def run_cli(*args):
    from click.testing import CliRunner

    from kcompress.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


# Graph ops whose FLOPs are multiply-accumulates (2 FLOPs each) in TensorFlow's profiler. Conv3DBackpropInputV2
# (Conv3DTranspose) and Einsum (EinsumDense, MultiHeadAttention) have no FLOP statistics registered in TF.
PROFILER_MAC_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "MatMul", "BatchMatMul",
                    "BatchMatMulV2", "BatchMatMulV3")


def profiler_macs(model, input_shape=None) -> int:
    """MACs of one sample by TensorFlow's profiler: the FLOPs of the multiply-accumulate ops, halved.

    The forward pass is traced to a graph at batch 1 and the profiler's op-type view read; bias adds, BatchNorm,
    activations and pooling are other op types and so left out. Function calls in the graph (tf_keras runs grouped
    convolutions in an XLA-compiled tf.function) are profiled too: their bodies come from the frozen graph (variables
    made constants, so their shapes are known) and are given the call's input shapes. Fails if an op of those types
    got no FLOP figure (the profiler skips ops whose shapes it cannot see), so a figure is never silently missing.
    Gotcha: the traced graph, not the frozen one, is profiled: re-importing a GraphDef drops the shapes tf_keras sets
    in Python (a transposed conv's output), and the profiler would then skip those ops.
    """
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from kcompress.backend import tf

    shape = tuple(input_shape or model.input_shape[1:])
    fn = tf.function(lambda x: model(x, training=False))
    traced = fn.get_concrete_function(tf.TensorSpec((1, *shape), tf.float32))
    frozen = convert_variables_to_constants_v2(traced).graph
    library = {f.signature.name: f for f in frozen.as_graph_def().library.function}
    flops = _profiled_mac_flops(traced.graph, frozen, library)
    assert flops % 2 == 0
    return flops // 2


def _profiled_mac_flops(graph, frozen, library) -> int:
    """MAC-op FLOPs of ``graph`` and of the functions it calls; ``frozen`` is its frozen twin (or None if frozen)."""
    from tensorflow.python.framework.function_def_to_graph import function_def_to_graph

    from kcompress.backend import tf

    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    root = tf.compat.v1.profiler.profile(graph, cmd="op", options=options)
    flops, seen, todo = 0, {}, [root]
    while todo:  # the op view is a tree of op types; each node's float_ops is its own type's
        node = todo.pop()
        todo.extend(node.children)
        if node.name in PROFILER_MAC_OPS:
            flops += node.float_ops
            seen[node.name] = len(node.graph_nodes)
    in_graph = {}
    for op in graph.get_operations():
        if op.type in PROFILER_MAC_OPS:
            in_graph[op.type] = in_graph.get(op.type, 0) + 1
        if op.type in ("PartitionedCall", "StatefulPartitionedCall"):
            twin = frozen.get_operation_by_name(op.name) if frozen is not None else op
            fdef = library[twin.get_attr("f").name]
            args = [f if t.dtype == tf.resource else t for t, f in zip(op.inputs, twin.inputs)]
            body = function_def_to_graph(fdef).as_graph_def()  # traced for any batch size: give it the call's shapes
            with tf.Graph().as_default() as sized:
                feeds = {f"{arg.name}:0": tf.compat.v1.placeholder(t.dtype, t.shape)
                         for arg, t in zip(fdef.signature.input_arg, args)}
                tf.graph_util.import_graph_def(body, input_map=feeds, name="")
            flops += _profiled_mac_flops(sized, None, library)
    assert seen == in_graph, f"the profiler counted {seen} of the graph's {in_graph}"
    return flops


def tree_hashes(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``: did anything there change?"""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out

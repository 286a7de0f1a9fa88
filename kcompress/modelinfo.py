"""What a Keras model is: input shape, classes, parameters and multiply-accumulates (MACs) per sample.

MACs are counted for the layers that multiply by weights or by each other: every convolution (1D/2D/3D, grouped,
depthwise, separable, transposed), Dense, EinsumDense, MultiHeadAttention (its four projections and its two attention
products), Attention/AdditiveAttention (their matrix products) and Dot. TensorFlow's profiler counts 2 FLOPs per MAC.
Gotchas:

- Everything else counts 0: BatchNorm, activations, pooling, bias adds, element-wise ops, and layers this module does
  not know (RNNs, ConvLSTM, LocallyConnected, raw tf ops in a functional model such as ``tf.matmul``).
- :func:`count_macs` traces the model's graph (nested functional sub-models included, and each call of a shared layer
  counted once per call) at the model's declared input size or at a stated ``input_shape``. A model declared with
  ``None`` sizes (fully convolutional, ``Input((None, None, 3))``) has no MAC count of its own: it raises
  :class:`KcompressError` unless the size is stated.
- Subclassed models cannot be traced layer by layer: their layers are counted at the shapes Keras recorded when they
  were first called, and a stated size is refused.
"""

from __future__ import annotations

import string

import numpy as np

from kcompress.backend import keras, tf
from kcompress.errors import KcompressError
from kcompress.internals import build_input_shape, is_graph_network, mha_parts, nodes_in_depth_order

__all__ = ["input_shape", "num_classes", "count_params", "flat_layers", "layer_macs", "count_macs", "macs_by_layer"]


def _single(shapes, what: str, need: str):
    """The one shape of a model's inputs or outputs (Keras gives a list when there are several)."""
    if isinstance(shapes, list):
        if len(shapes) != 1:
            raise KcompressError(f"models with {len(shapes)} {what} are not supported yet (need {need})")
        shapes = shapes[0]
    return shapes


def input_shape(model) -> tuple:
    """The model's single input shape without the batch axis."""
    return tuple(_single(model.input_shape, "inputs", "one input")[1:])


def num_classes(model) -> int:
    shape = _single(model.output_shape, "outputs", "one classifier output")
    if len(shape) != 2 or shape[-1] is None:
        raise KcompressError(f"the model's output shape {shape} is not a classifier's (batch, classes)")
    return int(shape[-1])


def count_params(model) -> dict[str, int]:
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(sum(np.prod(w.shape) for w in model.weights))
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def flat_layers(model):
    """The model's layers with nested models opened up (each layer once, even if it is called twice)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from flat_layers(layer)
        else:
            yield layer


# ---------------------------------------------------------------- shapes


def _is_shape(s) -> bool:
    return isinstance(s, (tuple, list)) and all(d is None or isinstance(d, (int, np.integer)) for d in s)


def _as_tuple(shape):
    """A shape as a tuple of sizes (None where open), None for unknown rank."""
    shape = tf.TensorShape(shape)
    return tuple(shape.as_list()) if shape.rank is not None else None


def _shape_of(t):
    return _as_tuple(t.shape)


def _shapes(structure):
    return tf.nest.map_structure(_shape_of, structure)


def _known(layer, shape) -> tuple:
    """``shape`` without its batch axis, every size known; otherwise the error that asks for an input size."""
    if shape is None or any(d is None for d in shape[1:]):
        raise KcompressError(
            f"layer {layer.name!r} ({type(layer).__name__}) sees shape {shape and (None, *shape[1:])}: its MACs depend on a size the model "
            "leaves open (an input declared with None). Count at a stated size instead, e.g. "
            "count_macs(model, input_shape=(224, 224, 3))."
        )
    return tuple(int(d) for d in shape[1:])


def _call_shapes(layer, args, kwargs, outputs):
    """(input shape(s), output shape(s)) of one call; MultiHeadAttention's inputs are [query, value, key]."""
    if isinstance(layer, keras.layers.MultiHeadAttention):
        args = list(args)
        query = args[0] if args else kwargs["query"]
        value = args[1] if len(args) > 1 else kwargs["value"]
        key = args[2] if len(args) > 2 else kwargs.get("key")
        inputs = [query, value, value if key is None else key]
    else:
        inputs = args[0] if args else kwargs.get("inputs")
    return _shapes(inputs), _shapes(outputs)


def _recorded_shapes(layer):
    """The shapes of the layer's first functional call, as Keras recorded them; else the shape it was built for.

    Layers inside a subclassed model have no recorded calls (Keras traces ``call`` in a scratch graph), only the
    input shape they were built with (:func:`kcompress.internals.build_input_shape`) and no output shape.
    """
    nodes = [n for n in getattr(layer, "inbound_nodes", []) if not n.is_input]
    if nodes:
        return _call_shapes(layer, nodes[0].call_args, nodes[0].call_kwargs, nodes[0].outputs)
    if isinstance(layer, keras.layers.MultiHeadAttention):
        try:
            shapes = mha_parts(layer)["shapes"]
        except KcompressError:  # never built: its shapes are unknown
            shapes = None
        if shapes is not None:
            return [_as_tuple(s) for s in shapes], None
    built = build_input_shape(layer)
    if built is None:
        raise KcompressError(f"layer {layer.name!r} has never been called, so its input shape is unknown; "
                             "pass input_shape")
    if isinstance(built, (list, tuple)) and built and not _is_shape(built):
        return [_as_tuple(s) for s in built], None
    return _as_tuple(built), None


# ---------------------------------------------------------------- per-layer formulas


def _split(layer, shape) -> tuple[int, int]:
    """(spatial size, channels) of a convolution's input or output shape, for either data format."""
    dims = _known(layer, shape)
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return int(np.prod(dims[1:])), dims[0]
    return int(np.prod(dims[:-1])), dims[-1]


def _einsum(equation: str, a, b) -> tuple[int, tuple]:
    """(MACs, output shape) of a two-operand einsum on per-sample shapes: one multiply-add per index combination.

    Every index's size is read from the operands (size-1 axes broadcast); ``...`` is expanded right-aligned.
    """
    equation = equation.replace(" ", "")
    lhs, out = equation.split("->")
    specs = lhs.split(",")
    spare = [c for c in string.ascii_letters if c not in equation]
    n_ell = max([len(s) - (len(p) - 3) for p, s in zip(specs, (a, b)) if "..." in p], default=0)
    pool = "".join(spare[:n_ell])
    sizes: dict[str, int] = {}
    for spec, shape in zip(specs, (a, b)):
        if "..." in spec:
            spec = spec.replace("...", pool[n_ell - (len(shape) - (len(spec) - 3)):])
        if len(spec) != len(shape):
            raise KcompressError(f"einsum {equation!r} does not fit an operand of shape {tuple(shape)}")
        for c, d in zip(spec, shape):
            sizes[c] = max(sizes.get(c, 1), int(d))
    out = out.replace("...", pool)
    return int(np.prod(list(sizes.values()), dtype=np.int64)), tuple(sizes[c] for c in out)


def _per_sample(layer, shape) -> tuple:
    return (1, *_known(layer, shape))


def _einsum_dense(layer, shape) -> tuple[int, tuple]:
    if not layer.built:
        raise KcompressError(f"layer {layer.name!r} is not built, so its kernel shape is unknown")
    return _einsum(layer.equation, _per_sample(layer, shape), tuple(layer.kernel.shape))


def _mha(layer, shapes) -> int:
    """Query, key and value projections, the query-key scores, the score-weighted values and the output projection."""
    parts = mha_parts(layer)
    q_shape, v_shape, k_shape = shapes
    mq, q = _einsum_dense(parts["query"], q_shape)
    mk, k = _einsum_dense(parts["key"], k_shape)
    mv, v = _einsum_dense(parts["value"], v_shape)
    ms, s = _einsum(parts["dot_product_equation"], k, q)
    mc, c = _einsum(parts["combine_equation"], s, v)
    mo, _ = _einsum(parts["output"].equation, c, tuple(parts["output"].kernel.shape))
    return mq + mk + mv + ms + mc + mo


def _dense_attention(layer, shapes) -> int:
    """``scores = query @ key^T`` (dot scoring only; additive scores are element-wise), then ``scores @ value``."""
    q = _known(layer, shapes[0])
    v = _known(layer, shapes[1])
    dot = isinstance(layer, keras.layers.Attention) and getattr(layer, "score_mode", "dot") == "dot"
    pairs = int(np.prod(q[:-1])) * v[-2]  # (extra batch axes x) Tq x Tv
    return pairs * (q[-1] if dot else 0) + pairs * v[-1]


def _dot(layer, shapes, out) -> int:
    """``keras.layers.Dot``: one multiply-add per output element and contracted position."""
    x = shapes[0]
    axes = layer.axes if isinstance(layer.axes, (list, tuple)) else [layer.axes, layer.axes]
    axis = axes[0] % len(x)
    if out is None:
        out = layer.compute_output_shape(shapes)
    return int(np.prod(_known(layer, out))) * _known(layer, x)[axis - 1]


def _conv(layer, in_shape, out) -> int:
    L = keras.layers
    k = int(np.prod(layer.kernel_size))
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        # every input position scatters k x filters products per input channel
        spatial, cin = _split(layer, in_shape)
        return spatial * k * cin * layer.filters
    if out is None:
        out = tuple(tf.TensorShape(layer.compute_output_shape(in_shape)).as_list())
    _, cin = _split(layer, in_shape)
    spatial, _ = _split(layer, out)
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return spatial * k * cin * layer.depth_multiplier
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):  # depthwise, then a 1x1 conv at the same size
        mid = cin * layer.depth_multiplier
        return spatial * k * mid + spatial * mid * layer.filters
    return spatial * k * (cin // max(1, int(getattr(layer, "groups", 1) or 1))) * layer.filters


def layer_macs(layer, input_shape=None, output_shape=None) -> int:
    """Multiply-accumulates of one call of ``layer`` for one sample.

    ``input_shape`` and ``output_shape`` are the call's full shapes with the batch axis first (its size is ignored),
    as ``layer.input_shape`` gives them; a list of shapes for a layer called on several tensors (MultiHeadAttention
    takes ``[query, value, key]``). Left out, the shapes Keras recorded at the layer's first call are used, which for
    a layer inside a nested or fully convolutional model may not be the size it runs at: :func:`count_macs` passes
    the traced ones. A nested model is counted with :func:`count_macs`. Raises :class:`KcompressError` when a size the
    count needs is ``None``. Layers with no multiplications (and unknown ones) count 0 without looking at shapes.
    """
    L = keras.layers
    if isinstance(layer, keras.Model):
        if input_shape is None:
            return count_macs(layer)
        shapes = [input_shape] if _is_shape(input_shape) else list(input_shape)
        return count_macs(layer, input_shape=[tuple(s[1:]) for s in shapes])
    counted = (L.Conv1D, L.Conv2D, L.Conv3D, L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D,
               L.SeparableConv2D, L.Dense, L.EinsumDense, L.MultiHeadAttention, L.Attention, L.AdditiveAttention,
               L.Dot, L.TimeDistributed)
    if not isinstance(layer, counted):
        return 0
    if input_shape is None:
        input_shape, output_shape = _recorded_shapes(layer)
    if isinstance(layer, L.TimeDistributed):  # the wrapped layer once per step of axis 1
        inner_out = None if output_shape is None else (output_shape[0], *output_shape[2:])
        inner = layer_macs(layer.layer, (input_shape[0], *input_shape[2:]), inner_out)
        return inner and _known(layer, input_shape)[0] * inner
    if isinstance(layer, L.Dense):
        dims = _known(layer, input_shape)
        return int(np.prod(dims[:-1])) * dims[-1] * layer.units
    if isinstance(layer, L.EinsumDense):
        return _einsum_dense(layer, input_shape)[0]
    if isinstance(layer, L.MultiHeadAttention):
        return _mha(layer, input_shape)
    if isinstance(layer, (L.Attention, L.AdditiveAttention)):
        return _dense_attention(layer, input_shape)
    if isinstance(layer, L.Dot):
        return _dot(layer, input_shape, output_shape)
    return _conv(layer, input_shape, output_shape)


# ---------------------------------------------------------------- whole models


def _is_graph_network(model) -> bool:
    return isinstance(model, keras.Model) and is_graph_network(model)


def _stated_shapes(model, stated) -> list[tuple]:
    """The input shapes (no batch axis) to trace at: the declared ones, or ``stated`` checked against them."""
    declared = [tuple(tf.TensorShape(t.shape).as_list()[1:]) for t in model.inputs]
    if stated is None:
        return declared
    if not isinstance(stated, (list, tuple)) or not all(isinstance(s, (list, tuple, int, np.integer)) for s in stated):
        raise KcompressError(f"input_shape must be a shape such as (224, 224, 3), or a list of them; got {stated!r}")
    shapes = [tuple(stated)] if _is_shape(stated) else [tuple(s) for s in stated]
    if len(shapes) != len(declared):
        raise KcompressError(f"input_shape gives {len(shapes)} shape(s) for a model with {len(declared)} input(s)")
    for given, want in zip(shapes, declared):
        fits = len(given) == len(want) and all(
            isinstance(g, (int, np.integer)) and g > 0 and (w is None or w == g) for g, w in zip(given, want))
        if not fits:
            raise KcompressError(f"input_shape {given} does not fit the model's input {want} (leave out the batch "
                                 "axis; sizes the model fixes must match)")
    return [tuple(int(g) for g in s) for s in shapes]


def _walk(model, inputs: list, rows: list, prefix: str) -> list:
    """Call each node of a functional ``model`` on traced tensors (sub-models recursively), recording MACs per call.

    This is Keras's own node-by-depth order (:func:`kcompress.internals.nodes_in_depth_order`).
    """
    env = {id(t): x for t, x in zip(model.inputs, inputs)}
    for node in nodes_in_depth_order(model):
        if node.is_input:
            continue
        layer = node.layer
        if any(id(t) not in env for t in node.keras_inputs):
            raise KcompressError(f"cannot trace {model.name!r}: layer {layer.name!r} takes a tensor from outside it")
        args, kwargs = tf.nest.map_structure(lambda v: env.get(id(v), v), (node.call_args, node.call_kwargs))
        if _is_graph_network(layer):
            sub = args[0] if args else kwargs["inputs"]
            flat = [sub[n] for n in layer.input_names] if isinstance(sub, dict) else tf.nest.flatten(sub)
            outputs = _walk(layer, flat, rows, f"{prefix}{layer.name}/")
        else:
            outputs = layer(*args, **kwargs)
            if isinstance(layer, keras.Model):  # subclassed: what Keras recorded is all there is to see
                rows.extend((f"{prefix}{layer.name}/{x.name}", x, layer_macs(x)) for x in flat_layers(layer))
            else:
                in_shape, out_shape = _call_shapes(layer, args, kwargs, outputs)
                rows.append((prefix + layer.name, layer, layer_macs(layer, in_shape, out_shape)))
        for kt, x in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
            env[id(kt)] = x
    return [env[id(t)] for t in model.outputs]


def macs_by_layer(model, input_shape=None) -> list[tuple[str, object, int]]:
    """``(path, layer, MACs)`` for every layer call in ``model``, one sample, in graph order.

    ``input_shape`` (no batch axis; for several inputs a list in ``model.inputs`` order) states the size to count at,
    which a model declared with ``None`` sizes needs; left out, the declared size is used. ``path`` is
    ``"backbone/conv1"`` for a layer of a nested model; a layer called twice appears twice. The graph is traced
    symbolically (nothing runs): about 0.2 s for ResNet50 at 224x224.
    """
    if not _is_graph_network(model):
        if input_shape is not None:
            raise KcompressError(f"{model.name!r} is a subclassed model: its layers can only be counted at the shapes "
                                 "they were first called with, not at a stated input_shape")
        return [(layer.name, layer, layer_macs(layer)) for layer in flat_layers(model)]
    shapes = _stated_shapes(model, input_shape)
    rows: list = []

    def forward(*xs):
        _walk(model, list(xs), rows, "")

    specs = [tf.TensorSpec((1, *s), t.dtype) for s, t in zip(shapes, model.inputs)]
    tf.function(forward, autograph=False).get_concrete_function(*specs)
    return rows


def count_macs(model, input_shape=None) -> int:
    """Multiply-accumulates for one sample; FLOPs are about twice this. See :func:`macs_by_layer` for ``input_shape``.

    Raises :class:`KcompressError` for a model declared with ``None`` sizes when no ``input_shape`` is given (and a
    layer's MACs depend on them).
    """
    return int(sum(m for _, _, m in macs_by_layer(model, input_shape)))

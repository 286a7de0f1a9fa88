"""One view of a model's graph for every stage: nested models inlined into one flat functional model.

Users build transfer-learning models as a ``keras.applications`` backbone used as one layer inside a small
functional or Sequential model with a new head (``Sequential([MobileNetV2(include_top=False), GAP, Dense(10)])``).
A stage that walks ``model.layers`` sees the backbone as one opaque layer; so every stage that looks inside a model
(magnitude and structured pruning, QAT, sensitivity, student derivation) first calls :func:`flatten_model`, and
MACs are traced through the same graph (:mod:`kcompress.modelinfo`).

What flattening keeps and changes:

- the computation: the flat model gives the same outputs as the original, and it saves and loads with plain
  tf_keras. Its layers are fresh copies (same config, same weights), never the user's layer objects: a layer object
  that belongs to two graphs has two sets of outbound nodes, and tfmot's pattern matching then sees a convolution
  with two consumers and does not fold its BatchNorm (a nested MobileNetV2's QAT file had 52 extra MUL/ADD ops);
- shared layers stay shared: a layer object called twice (also through a nested model called twice) is one layer;
- names stay unique: when two nested models hold different layers of the same name (two backbones, ConvNeXt's
  stem/downsampling ``Sequential`` models), the later ones are renamed ``<nested model>_<layer>``;
- the nesting is gone: a stage's output model is flat. :func:`nesting` records what was inlined, so a stage can say
  so (``"flattened: nested model 'mobilenetv2_1.00_96' (154 layers) inlined"``).

Gotchas: subclassed models (no layer graph), at the top or nested, cannot be flattened (:class:`KcompressError`
naming the model). A nested model's own input layer disappears; random-augmentation layers (``RandomFlip`` ...)
are kept as they are: they do nothing at inference and in every export (see :data:`AUGMENTATION_LAYERS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kcompress.backend import keras, tf
from kcompress.errors import KcompressError
from kcompress.internals import is_graph_network, nodes_in_depth_order, tensor_usage_count

__all__ = ["Nesting", "flatten_model", "is_nested", "nesting", "is_graph_model", "model_nodes", "node_of",
           "AUGMENTATION_LAYERS", "augmentation_layers"]

L = keras.layers

#: Layers that change their input only in training (identity at inference, in every export).
AUGMENTATION_LAYERS = tuple(getattr(L, n) for n in (
    "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness",
    "RandomHeight", "RandomWidth") if hasattr(L, n))


@dataclass(frozen=True)
class Nesting:
    """What :func:`flatten_model` inlined: nested model paths (``outer/inner``) with their layer counts, and the
    layers it had to copy under a new name (old path -> new name)."""

    models: dict[str, int] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.models)

    def describe(self) -> str:
        """One line for a stage's log, or "" when nothing was nested."""
        if not self.models:
            return ""
        parts = ", ".join(f"{name!r} ({n} layers)" for name, n in self.models.items())
        text = f"nested model(s) {parts} inlined: the output is one flat functional model"
        if self.renamed:
            text += f"; {len(self.renamed)} layer(s) renamed to keep names unique"
        return text


def is_graph_model(model) -> bool:
    """Functional or Sequential (a graph of layers a stage can walk), not subclassed."""
    return is_graph_network(model) or isinstance(model, keras.Sequential)


def model_nodes(model) -> set[int]:
    """``id()`` of every node (one call of a layer) in a functional model's own graph, found from its outputs with
    public API (``KerasTensor.node``, ``Node.parent_nodes``).

    Gotcha: a layer's ``inbound_nodes`` also holds its calls in other graphs (a nested model's own graph, or the
    model a flattened copy was made from), so "the layer's first node" is not always this model's.
    """
    todo = [t.node for t in model.outputs if t.node is not None]
    seen: set[int] = set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(node.parent_nodes)
    return seen


def node_of(model, layer):
    """The node of ``layer`` in ``model``'s own graph (its first there), or None."""
    nodes = model_nodes(model)
    return next((n for n in layer.inbound_nodes if id(n) in nodes), None)


def is_nested(model) -> bool:
    """True when a layer of ``model`` is itself a model."""
    return any(isinstance(layer, keras.Model) for layer in model.layers)


def augmentation_layers(model) -> list[str]:
    """Names of the random-augmentation layers in ``model`` (nested models included)."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += augmentation_layers(layer)
        elif isinstance(layer, AUGMENTATION_LAYERS):
            out.append(layer.name)
    return out


def _leaves(model, path: str, seen: dict, order: list, models: dict) -> None:
    """Every non-model layer under ``model`` once (first path wins), and each nested model's layer count."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            sub = f"{path}/{layer.name}" if path else layer.name
            if not is_graph_model(layer):
                raise KcompressError(f"nested model {sub!r} is a subclassed model: no stage can see inside it "
                                     "(rebuild it as a functional or Sequential model)")
            models.setdefault(sub, len(layer.layers))
            _leaves(layer, sub, seen, order, models)
        elif id(layer) not in seen:
            seen[id(layer)] = path
            order.append(layer)


def _unique(model) -> tuple[dict[int, object], Nesting, list]:
    """A fresh copy of each original layer object (renamed where names collide); and the (original, copy) pairs whose
    weights must be copied once the copies are built."""
    seen: dict[int, str] = {}
    order: list = []
    models: dict[str, int] = {}
    _leaves(model, "", seen, order, models)
    taken: set[str] = set()
    use: dict[int, object] = {}
    renamed: dict[str, str] = {}
    copies = []
    for layer in order:
        name = layer.name
        if name in taken:
            base = f"{seen[id(layer)].split('/')[-1]}_{layer.name}"
            name, i = base, 1
            while name in taken:
                i += 1
                name = f"{base}_{i}"
            renamed[f"{seen[id(layer)]}/{layer.name}"] = name
        taken.add(name)
        use[id(layer)] = _copy(layer, name)
        copies.append((layer, use[id(layer)]))
    return use, Nesting(models, renamed), copies


def _copy(layer, name: str):
    """A fresh, unbuilt layer with ``layer``'s config under ``name`` (weights are set once it is built)."""
    if isinstance(layer, L.InputLayer):
        return layer
    with keras.utils.custom_object_scope({type(layer).__name__: type(layer)}):
        return type(layer).from_config({**layer.get_config(), "name": name})


def nesting(model) -> Nesting:
    """What :func:`flatten_model` would inline (empty when nothing is nested)."""
    if not is_nested(model):
        return Nesting()
    return _unique(model)[1]


def flatten_model(model, *, with_nesting: bool = False):
    """The same network as one flat functional model: nested models inlined, every layer a copy with its weights.

    Returns ``model`` itself when nothing is nested (``(model, nesting)`` with ``with_nesting``). Raises
    :class:`KcompressError` for subclassed models, at the top or nested.
    """
    if not is_nested(model):
        return (model, Nesting()) if with_nesting else model
    if not is_graph_model(model):
        raise KcompressError(f"model {model.name!r} is a subclassed model; stages need a functional or Sequential "
                             "model to see inside it")
    use, info, copies = _unique(model)

    def call(layer, args, kwargs):
        if isinstance(layer, keras.Model):
            outs = run(layer, tf.nest.flatten((args, kwargs)))
            return outs[0] if len(outs) == 1 else outs
        return use[id(layer)](*args, **kwargs)

    def run(m, inputs):
        if not is_graph_network(m):  # a Sequential without a graph of its own
            x = inputs[0]
            for layer in m.layers:
                x = call(layer, (x,), {})
            return [x]
        tensors: dict[str, list] = {}
        usage = tensor_usage_count(m)
        for x, y in zip(m.inputs, inputs):
            key = str(id(x))
            tensors[key] = [y] * usage[key]
        for node in nodes_in_depth_order(m):
            if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            outs = call(node.layer, args, kwargs)
            for key, y in zip(node.flat_output_ids, tf.nest.flatten(outs)):
                tensors[key] = [y] * usage[key]
        return [tensors[str(id(x))].pop() for x in m.outputs]

    inputs = [L.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name.split(":")[0]) for x in model.inputs]
    try:
        outputs = run(model, inputs)
        flat = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
    except ValueError as e:
        raise KcompressError(f"cannot flatten the nested model {model.name!r}: {str(e).splitlines()[0]}") from None
    for orig, new in copies:
        if new is not orig:
            new.set_weights(orig.get_weights())
    return (flat, info) if with_nesting else flat


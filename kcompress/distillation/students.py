"""Students derived from a teacher's own architecture: every width multiplied by W, freshly initialised.

:func:`derive_student` rewrites the teacher's config (Sequential or functional): ``filters`` of convolutions and
``units`` of Dense layers become ``max(1, round(W * n))``. Depthwise convolutions follow their input's width. Widths
are kept where changing them would break the graph or the task:

- the classifier (any width-setting layer whose channels reach a model output) keeps its units;
- tensors joined by ``Add``/``Subtract``/``Multiply``/``Average``/``Maximum``/``Minimum`` (e.g. residual shortcuts)
  must agree in channels: the layers feeding one join form a group that is scaled together, or kept as a whole when
  any member cannot change (the model input, the classifier, a ``Reshape``/``Permute``/``Lambda`` that hard-codes a
  shape, or a join of concatenated tensors, where rounding could break the sum).

Gotcha: nested models (a model used as a layer) are not rewritten; pass a student model file instead.
"""

from __future__ import annotations

import copy

from kcompress.backend import keras
from kcompress.errors import KcompressError, UsageError

__all__ = ["derive_student", "outputs_probabilities", "scaled_layers"]

L = keras.layers
_WIDTH_ATTR = {"filters": (L.Conv1D, L.Conv2D, L.Conv3D, L.SeparableConv1D, L.SeparableConv2D, L.Conv2DTranspose,
                           L.Conv1DTranspose, L.Conv3DTranspose),
               "units": (L.Dense,)}
_JOINS = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_BARRIERS = (L.Reshape, L.Permute, L.Lambda)
_INPUT = "__input__"


def outputs_probabilities(model) -> bool:
    """True when the model's output is a softmax, read from the layer that produces the output (see
    :func:`kcompress.evaluation.output_kind`)."""
    from kcompress.evaluation import PROBABILITIES, output_kind

    return output_kind(model) == PROBABILITIES


def _width_attr(layer):
    for attr, classes in _WIDTH_ATTR.items():
        if isinstance(layer, classes):
            return attr
    return None


class _Groups:
    """Union-find over channel sources (width-setting layer names and the model input)."""

    def __init__(self):
        self.parent = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def _inbound_layers(layer, model) -> list:
    names = {id(x) for x in model.layers}
    found = []
    for node in layer._inbound_nodes:
        inbound = node.inbound_layers
        inbound = inbound if isinstance(inbound, (list, tuple)) else [inbound]
        for il in inbound:
            if id(il) in names and il not in found:
                found.append(il)
    return found


def scaled_layers(model) -> dict[str, bool]:
    """``{layer name: True if its width may scale}`` for every width-setting layer (see the module docstring)."""
    layers = list(model.layers)
    for layer in layers:
        if isinstance(layer, keras.Model):
            raise KcompressError(
                f"the teacher contains a nested model ({layer.name}); --student-width cannot rewrite it: "
                "pass a student model with --student"
            )
    groups = _Groups()
    fixed = set()
    source: dict[str, frozenset] = {}  # layer name -> channel sources of its output
    sequential = isinstance(model, keras.Sequential)
    prev = frozenset([_INPUT])
    for layer in layers:
        if isinstance(layer, L.InputLayer):
            source[layer.name] = frozenset([_INPUT])
            prev = source[layer.name]
            continue
        ins = [prev] if sequential else [source.get(il.name, frozenset([_INPUT])) for il in _inbound_layers(layer, model)]
        ins = ins or [frozenset([_INPUT])]
        attr = _width_attr(layer)
        if attr is not None:
            out = frozenset([layer.name])
        elif isinstance(layer, _JOINS) or (len(ins) > 1 and not isinstance(layer, L.Concatenate)):
            members = [m for s in ins for m in s]
            for m in members[1:]:
                groups.union(members[0], m)
            if any(len(s) > 1 for s in ins):
                fixed.update(members)
            out = ins[0]
        elif isinstance(layer, L.Concatenate):
            axis = layer.axis
            if axis in (-1, len(layer.output_shape) - 1):
                out = frozenset().union(*ins)
            else:  # joins along another axis: channels must agree
                members = [m for s in ins for m in s]
                for m in members[1:]:
                    groups.union(members[0], m)
                out = ins[0]
        elif isinstance(layer, _BARRIERS):
            fixed.update(ins[0])
            out = frozenset([_INPUT])
        else:  # elementwise, normalisation, pooling, padding, depthwise, flatten, dropout...
            out = ins[0]
        source[layer.name] = out
        prev = out
    outputs = [prev] if sequential else [source[lyr.name] for lyr in _output_layers(model)]
    for s in outputs:
        fixed.update(s)
    fixed.add(_INPUT)
    fixed_roots = {groups.find(m) for m in fixed}
    return {
        layer.name: groups.find(layer.name) not in fixed_roots for layer in layers if _width_attr(layer) is not None
    }


def _output_layers(model):
    return [t._keras_history.layer for t in model.outputs]


def derive_student(teacher, width: float, name: str | None = None):
    """A freshly initialised copy of ``teacher``'s architecture with its widths multiplied by ``width``."""
    if not 0 < width < 1:
        raise UsageError(f"--student-width must be between 0 and 1 (a fraction of the teacher's widths), got {width}")
    if not isinstance(teacher, keras.Sequential) and not getattr(teacher, "_is_graph_network", False):
        raise KcompressError(
            "--student-width needs a Sequential or functional teacher (a subclassed model has no architecture config); "
            "pass a student model with --student"
        )
    scalable = scaled_layers(teacher)
    if not any(scalable.values()):
        raise KcompressError("the teacher has no layer whose width can be scaled (only the classifier)")
    config = copy.deepcopy(teacher.get_config())
    by_name = {lyr.name: lyr for lyr in teacher.layers}
    for entry in config["layers"]:
        if "trainable" in entry["config"]:
            entry["config"]["trainable"] = True  # a frozen teacher's config records trainable=False
        lname = entry["config"].get("name")
        if scalable.get(lname):
            attr = _width_attr(by_name[lname])
            entry["config"][attr] = max(1, int(round(width * entry["config"][attr])))
    config.pop("trainable", None)
    config["name"] = name or f"{teacher.name}_student"
    try:
        student = teacher.__class__.from_config(config)
    except Exception as e:  # noqa: BLE001 - from_config raises many types
        raise KcompressError(f"cannot build the width-{width:g} student from the teacher's config: {e}") from None
    if getattr(student, "_is_graph_network", False) or student.built:
        return student
    student.build((None, *teacher.input_shape[1:]))
    return student

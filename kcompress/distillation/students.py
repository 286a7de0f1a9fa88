"""Students derived from a teacher's own architecture: every width multiplied by W, freshly initialised.

:func:`derive_student` rewrites the teacher's config (Sequential or functional): ``filters`` of convolutions and
``units`` of Dense layers become ``max(1, round(W * n))``. Depthwise convolutions follow their input's width. Widths
are kept where changing them would break the graph or the task:

- the classifier (any width-setting layer whose channels reach a model output) keeps its units;
- tensors joined by ``Add``/``Subtract``/``Multiply``/``Average``/``Maximum``/``Minimum`` (e.g. residual shortcuts)
  must agree in channels: the layers feeding one join form a group that is scaled together, or kept as a whole when
  any member cannot change (the model input, the classifier, a ``Reshape``/``Permute``/``Lambda`` that hard-codes a
  shape, or a join of concatenated tensors, where rounding could break the sum).

- a grouped convolution with one group per channel (ConvNeXt's depthwise ``Conv2D``) follows its input's width;
  other grouped convolutions keep the width of what feeds them;
- a ``Reshape`` that keeps the channels last (squeeze-excite's ``(1, 1, C)``) follows its input's new width;
  so does a layer that is not built into Keras but sizes a per-channel weight by ``projection_dim`` (ConvNeXt's
  ``LayerScale``); other ``Reshape`` layers, ``Permute``, ``Lambda`` and other layers that are not built into Keras
  keep the width of what feeds them.

:func:`sliced_student` is the other way to a width-W student (``student_init: teacher``): the teacher itself with
every channel group cut to its ``W * n`` channels of largest L1 norm (structured pruning's ratio step, frozen groups
such as the classifier whole), so the student starts from what the teacher learnt instead of from noise.

Nested models (a ``keras.applications`` backbone used as a layer) are inlined first
(:func:`kcompress.graph.flatten_model`): the student is one flat functional model with the backbone's layers
scaled too; :func:`derive_student` says so through ``log``.
"""

from __future__ import annotations

import copy

from kcompress.backend import keras
from kcompress.errors import KcompressError, UsageError
from kcompress.internals import is_graph_network

__all__ = ["derive_student", "make_student", "outputs_probabilities", "scaled_layers", "sliced_student"]

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
    for node in layer.inbound_nodes:
        inbound = node.inbound_layers
        inbound = inbound if isinstance(inbound, (list, tuple)) else [inbound]
        for il in inbound:
            if id(il) in names and il not in found:
                found.append(il)
    return found


def _builtin(layer) -> bool:
    return type(layer).__module__.startswith(("tf_keras.src.layers", "keras.src.layers", "keras.layers"))


def _keeps_channels(layer, ins_shape) -> bool:
    """A Reshape whose output's last axis is its input's channel axis, e.g. squeeze-excite's ``(1, 1, C)``."""
    target = layer.target_shape
    return bool(target) and ins_shape is not None and target[-1] == ins_shape[-1] and target[-1] is not None


def scaled_layers(model, follow: dict | None = None) -> dict[str, bool]:
    """``{layer name: True if its width may scale}`` for every width-setting layer (see the module docstring).

    ``follow`` (filled when given): ``{reshape layer name: its input's channel sources}`` for the reshapes whose
    last axis must follow the new width."""
    layers = list(model.layers)
    for layer in layers:
        if isinstance(layer, keras.Model):
            raise KcompressError(f"nested model {layer.name!r}: flatten the teacher first (kcompress.graph)")
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
        if getattr(layer, "groups", 1) > 1:  # grouped conv: depthwise-like ones follow their input, others fix it
            if layer.groups == layer.filters == layer.input_shape[-1]:
                if follow is not None:
                    follow[layer.name] = ins[0]
            else:
                fixed.update(m for s in ins for m in s)
            out = ins[0]
        elif attr is not None:
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
        elif isinstance(layer, L.Reshape) and _keeps_channels(layer, layer.input_shape):
            if follow is not None:
                follow[layer.name] = ins[0]
            out = ins[0]
        elif not _builtin(layer) and layer.get_config().get("projection_dim") == layer.input_shape[-1]:
            if follow is not None:  # ConvNeXt's LayerScale: a per-channel scale sized by projection_dim
                follow[layer.name] = ins[0]
            out = ins[0]
        elif isinstance(layer, _BARRIERS) or not _builtin(layer):
            fixed.update(m for s in ins for m in s)
            out = frozenset([_INPUT]) if isinstance(layer, _BARRIERS) else ins[0]
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
        layer.name: groups.find(layer.name) not in fixed_roots for layer in layers
        if _width_attr(layer) is not None and getattr(layer, "groups", 1) == 1
    }


def _output_layers(model):
    return [t.node.layer for t in model.outputs]


def _check_width(width: float) -> None:
    if not 0 < width < 1:
        raise UsageError(f"--student-width must be between 0 and 1 (a fraction of the teacher's widths), got {width}")


def derive_student(teacher, width: float, name: str | None = None, log=None):
    """A freshly initialised copy of ``teacher``'s architecture with its widths multiplied by ``width``
    (nested models inlined: see the module docstring)."""
    from kcompress.graph import flatten_model

    _check_width(width)
    if not isinstance(teacher, keras.Sequential) and not is_graph_network(teacher):
        raise KcompressError(
            "--student-width needs a Sequential or functional teacher (a subclassed model has no architecture config); "
            "pass a student model with --student"
        )
    teacher, nested = flatten_model(teacher, with_nesting=True)
    if nested and log is not None:
        log(f"student: {nested.describe()}")
    follow: dict = {}
    scalable = scaled_layers(teacher, follow)
    if not any(scalable.values()):
        raise KcompressError("the teacher has no layer whose width can be scaled (only the classifier)")
    config = copy.deepcopy(teacher.get_config())
    by_name = {lyr.name: lyr for lyr in teacher.layers}
    for entry in config["layers"]:
        entry.pop("build_config", None)  # the teacher's input shapes; layers build from their new inputs
        if "trainable" in entry["config"]:
            entry["config"]["trainable"] = True  # a frozen teacher's config records trainable=False
        lname = entry["config"].get("name")
        if scalable.get(lname):
            attr = _width_attr(by_name[lname])
            entry["config"][attr] = max(1, int(round(width * entry["config"][attr])))
    new_width = {e["config"]["name"]: e["config"][_width_attr(by_name[e["config"]["name"]])]
                 for e in config["layers"] if e["config"].get("name") in scalable}
    for entry in config["layers"]:
        sources = follow.get(entry["config"].get("name"))
        if not sources or _INPUT in sources:
            continue
        width_in = sum(new_width[m] for m in sources)
        if "groups" in entry["config"]:  # depthwise-like grouped conv
            entry["config"]["groups"] = entry["config"]["filters"] = width_in
        elif "projection_dim" in entry["config"]:
            entry["config"]["projection_dim"] = width_in
        else:
            entry["config"]["target_shape"] = [*list(entry["config"]["target_shape"])[:-1], width_in]
    config.pop("trainable", None)
    config["name"] = name or f"{teacher.name}_student"
    try:
        custom = {type(la).__name__: type(la) for la in teacher.layers if not _builtin(la)}
        with keras.utils.custom_object_scope(custom):
            student = teacher.__class__.from_config(config)
    except Exception as e:  # noqa: BLE001 - from_config raises many types
        raise KcompressError(f"cannot build the width-{width:g} student from the teacher's config: {e}") from None
    if is_graph_network(student) or student.built:
        return student
    student.build((None, *teacher.input_shape[1:]))
    return student


def sliced_student(teacher, width: float, name: str | None = None, log=None):
    """The teacher cut to ``width`` of its channels in every prunable group, the kept channels (largest L1 norm)
    keeping their weights and BatchNorm statistics; what structured pruning cannot cut (the classifier, barriers,
    grouped convolutions) stays whole, so its parameter count can differ a little from :func:`derive_student`'s. The
    student is one flat functional model (a Sequential teacher too)."""
    from kcompress.graph import flatten_model
    from kcompress.modelinfo import count_params
    from kcompress.pruning.channels import as_functional
    from kcompress.pruning.structured import MIN_KEEP, StructuredPlan, prune_once

    _check_width(width)
    flat, nested = flatten_model(as_functional(teacher), with_nesting=True)
    if nested and log is not None:
        log(f"student: {nested.describe()}")
    plan = StructuredPlan(target_flops=None, ratio=1.0 - width, criterion="l1", rounds=1, epochs=0, batch_size=1,
                          lr=0.0, seed=0, multiple=1, min_keep=min(MIN_KEEP, width))
    try:
        student, graph = prune_once(flat, plan, ratio=1.0 - width)
    except KcompressError:
        raise
    except Exception as e:  # noqa: BLE001 - the rebuild raises many types on layers it cannot cut
        raise KcompressError(f"cannot cut the teacher's channels ({type(e).__name__}: {e})") from None
    if not graph.groups() or count_params(student)["total"] >= count_params(flat)["total"]:
        raise KcompressError("the teacher has no channel group that can be cut (only frozen layers)")
    student._name = name or f"{teacher.name}_student"
    for layer in student.layers:
        layer.trainable = True  # a frozen teacher's layers
    return student


def make_student(teacher, width: float, init="auto", log=None):
    """The width-``width`` student of ``teacher``: :func:`sliced_student` (init ``teacher``), :func:`derive_student`
    (``scratch``), or ``auto``: sliced when the teacher has channel groups structured pruning can cut, else fresh.
    Says which through ``log``."""
    init = str(init)
    if init == "scratch":
        return derive_student(teacher, width, log=log)
    try:
        student = sliced_student(teacher, width, log=log)
    except KcompressError as e:
        if init == "teacher":
            raise KcompressError(f"--student-init teacher: {e}; use --student-init scratch or pass a student with "
                                 "--student") from None
        if log is not None:
            log(f"student: freshly initialised (student_init auto: {e})")
        return derive_student(teacher, width, log=log)
    if log is not None:
        log(f"student: width {width:g}, initialised from the teacher's largest-L1 channels (student_init {init})")
    return student

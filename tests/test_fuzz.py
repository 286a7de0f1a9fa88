"""Property-based fuzzing (hypothesis) of what reads user text: the benchmark_model log parser and the pipeline
config loader. For any input: a parse result or one clear KcompressError, never another exception."""

import dataclasses
import json
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings  # the test extra installs it
from hypothesis import strategies as st

from kcompress.bench.logparse import parse_benchmark_log, split_runs, strip_log_prefix
from kcompress.bench.schema import BenchReport, json_clean
from kcompress.errors import KcompressError, UsageError
from kcompress.pipeline.config import RunConfig, apply_overrides, config_from_dict, config_hash, load_config

# Bounded (the file runs in seconds) and without an example database (nothing written into the checkout).
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------------ the log parser
# Real benchmark_model lines (native binary and APK logcat), whole and as fragments to mutate.
LOG_LINES = [
    "STARTING!",
    "Log parameter values verbosely: [0]",
    "Num threads: [4]",
    "Graph: [/data/local/tmp/kc/model.tflite]",
    "#threads used for CPU inference: [4]",
    "Use gpu: [1]",
    "Use xnnpack: [1]",
    "Loaded model /data/local/tmp/kc/model.tflite",
    "The input model file size (MB): 0.0843",
    "Initialized session in 12.345ms.",
    "Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.",
    "count=58 first=31012 curr=8017 min=7741 max=31012 avg=8629.52 std=3081",
    "count=1 curr=2950340(all same)",
    "count=50 first=8172 curr=8032 min=7702 max=9421 avg=8146.06 std=299 p5=7754 median=8087 p95=8740",
    "Inference timings in us: Init: 12345, First inference: 31012, Warmup (avg): 8629.52, Inference (avg): 8146.06",
    "Memory footprint delta from the start of the tool (MB): init=3.125 overall=6.5",
    "Peak memory footprint (MB): init=2.1 overall=4.2",
    "Overall peak memory footprint (MB) via periodic monitoring: 7.9",
    "Replacing 12 out of 14 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 2 partitions.",
    "Replacing 3 out of 9 node(s) with delegate (TfLiteGpuDelegateV2) node, yielding 1 partitions for the whole graph.",
    "Though GPU delegate is explicitly applied, the model graph will not be executed by the delegate.",
    "ERROR: Failed to apply GPU delegate.",
    "Benchmarking failed.",
    "Profiling Info for Regular Benchmark Runs:",
    "============================== Summary by node type ==============================",
    "\t             [Node type]\t  [count]\t  [avg ms]\t    [avg %]\t    [cdf %]\t  [mem KB]\t[times called]",
    "\t                 CONV_2D\t        2\t     0.411\t    52.760%\t    52.760%\t     0.000\t        2",
    "\t         FULLY_CONNECTED\t        1\t     0.101\t    12.966%\t    65.726%\t     0.000\t        1",
    "============================== Top by Computation Time ==============================",
    "\t             [node type]\t  [first]\t [avg ms]\t     [%]\t     [cdf%]\t  [mem KB]\t[times called]\t[Name]",
    "\t                 CONV_2D\t    0.301\t    0.291\t 37.356%\t    37.356%\t     0.000\t        1\t[conv1]",
    "Timings (microseconds): count=50 first=779 curr=751 min=740 max=1010 avg=779.2 std=52",
    "Memory (bytes): count=0",
    "",
]
PREFIXES = ["", "INFO: ", "WARN: ", "ERROR: ", "VERBOSE: ", "11-27 10:13:27.530  9157  9157 I tflite  : ",
            "11-27 10:13:27.530 I/tflite  ( 9157): ", "I/tflite  ( 9157): ", "E/tflite: "]
NUMBERS = ["0", "-1", "1e308", "1e999", "nan", "-inf", "inf", "99999999999999999999999", "0.0", "+.5", "3.", "x",
           "٣", "²", ""]


@st.composite
def log_line(draw):
    line = draw(st.sampled_from(LOG_LINES))
    how = draw(st.integers(0, 4))
    if how == 1:  # a number swapped for an odd one
        import re

        spans = [m.span() for m in re.finditer(r"\d+(?:\.\d+)?", line)]
        if spans:
            a, b = draw(st.sampled_from(spans))
            line = line[:a] + draw(st.sampled_from(NUMBERS)) + line[b:]
        if spans and draw(st.booleans()):  # and a pair with an odd number appended
            line += f" {draw(st.sampled_from(['count', 'avg', 'curr', 'median', 'p5']))}={draw(st.sampled_from(NUMBERS))}"
    elif how == 2:  # cut short
        line = line[: draw(st.integers(0, len(line)))]
    elif how == 3:  # arbitrary text spliced in
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.text(max_size=12)) + line[at:]
    elif how == 4:
        line = draw(st.text(max_size=60))
    if draw(st.integers(0, 5)) == 0:  # two lines run together (a lost newline): repeated keys, odd tails
        line += draw(st.sampled_from([" ", "\t", ""])) + draw(st.sampled_from(LOG_LINES))
    return draw(st.sampled_from(PREFIXES)) + line


LOGS = st.one_of(st.text(max_size=400), st.lists(log_line(), max_size=30).map("\n".join))


def _check_log(text: str) -> None:
    for piece in split_runs(text) or [text]:
        log = parse_benchmark_log(piece)
        log.failed, log.failure_reason(), log.threads, log.graph, log.delegate(), log.delegate_coverage("gpu")
        result = log.to_result(model="m.tflite")
        doc = BenchReport(target={"kind": "android"}, results=(result,)).to_dict()
        text_json = json.dumps(json_clean(doc), allow_nan=False)
        back = BenchReport.from_dict(json.loads(text_json))  # what the parser writes, the schema reads back
        assert back.results[0].model == "m.tflite"


@FUZZ
@given(LOGS)
def test_log_parser_never_raises(text):
    for line in text.splitlines():
        strip_log_prefix(line)
    _check_log(text)


def test_log_parser_fuzz_reaches_the_parsed_fields():
    """The strategy is not vacuous: the real lines it mutates parse into every kind of field."""
    running = LOG_LINES[10]
    lines = [line for line in LOG_LINES if not line.startswith("count=")]
    at = lines.index(running)
    lines[at:at + 1] = [running, LOG_LINES[11], running, LOG_LINES[13]]  # warm-up, then the measured runs
    log = parse_benchmark_log("\n".join(lines))
    assert log.measured is not None and log.measured.count == 50 and log.warmup.count == 58
    assert log.inference_avg_us == 8146.06 and log.memory_mb["peak_periodic"] == 7.9
    assert log.delegate_lines and log.op_profile and log.failures and log.threads == 4


@pytest.mark.parametrize("text", [
    "Num threads: [²]",  # a Unicode digit that str.isdigit accepts and int() does not
    "count=5 count=nan",  # the later pair wins: a NaN count
    "count=5 avg=1 count=inf",
    "============================== Summary by node type ==============================\n"
    "\t[Node type]\t[count]\t[avg ms]\n\tCONV_2D\tnan\t0.4",
    "============================== Summary by node type ==============================\n"
    "\t[Node type]\t[count]\t[avg ms]\n\tCONV_2D\tinf\t0.4",
])
def test_log_parser_odd_numbers_found_by_fuzzing(text):
    _check_log(text)


# ------------------------------------------------------------------------------------------------ the config loader
def _sections() -> dict[str, list[str]]:
    out = {}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        out[f.name] = [g.name for g in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []
    return out


SECTIONS = _sections()
KEYS = sorted({k for keys in SECTIONS.values() for k in keys} | set(SECTIONS))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["int8", "never", "2:4", "linear:8:2", "flip,crop:4", "1/255", "1/0", "nan", "inf", "-1", "0",
                     "1e999", "digits:val", "auto", "sgd", "cosine", "structured", "block", "a,b", "", "none"]),
    st.dates(), st.binary(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner,
                                                 max_size=4)), max_leaves=12)


@st.composite
def raw_config(draw):
    """A config dict that is mostly well-formed (known sections and keys) with arbitrary values: the checks deep
    in the options classes are reached, not only the unknown-key check."""
    raw = {}
    if draw(st.booleans()):
        raw["model"] = {"path": "m.keras"}
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        keys = SECTIONS[name]
        if not keys:
            raw[name] = draw(VALUES)
            continue
        section = raw.setdefault(name, {}) if draw(st.integers(0, 9)) else draw(VALUES)
        if isinstance(section, dict):
            for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
                section[key] = draw(VALUES)
        raw[name] = section
    if draw(st.integers(0, 9)) == 0:
        raw[draw(st.text(max_size=6))] = draw(VALUES)
    return raw


def _load_or_refuse(raw):
    try:
        cfg = config_from_dict(raw)
    except KcompressError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return None
    assert isinstance(cfg, RunConfig)
    config_hash(cfg)  # a valid config hashes (its values are plain data)
    # what the stages derive from a valid config works too
    cfg.train.augment_steps, cfg.prune.block_shape, cfg.prune.num_rounds(), cfg.distill.rate(), cfg.qat.rate()
    return cfg


@FUZZ
@given(raw_config())
def test_config_from_any_dict_is_a_config_or_one_clear_error(raw):
    _load_or_refuse(raw)


@FUZZ
@given(VALUES)
def test_config_from_any_value_is_a_config_or_one_clear_error(raw):
    _load_or_refuse(raw)


OVERRIDE = st.one_of(
    st.text(max_size=30),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(sorted(SECTIONS)), st.sampled_from(KEYS),
              st.one_of(st.text(max_size=10), st.sampled_from(["[1", "{a: 1}", "1e999", "!!binary AAAA", "null", "",
                                                               "2024-01-01", "- x", "'", "&a x", "*a"]))),
)


@FUZZ
@given(raw_config(), st.lists(OVERRIDE, max_size=3))
def test_overrides_on_any_config_are_a_config_or_one_clear_error(raw, overrides):
    try:
        raw = apply_overrides(raw, overrides)
    except UsageError:
        return
    _load_or_refuse(raw)


YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.builds(lambda head, body: head + body, st.sampled_from(["name: t\nmodel: {path: m.keras}\n", "", "---\n",
                                                              "prune:\n", "%YAML 1.1\n---\n"]),
              st.text(alphabet=st.sampled_from(list("abcdefgpru:_.-[]{},'\"!&*#|>? \n\t019e")), max_size=120)),
)


@FUZZ
@given(text=YAML_TEXT)
def test_config_file_with_any_text_is_a_config_or_one_clear_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg, raw = load_config(str(path))
    except KcompressError as e:
        assert str(e).strip()
        return
    assert isinstance(cfg, RunConfig)


def test_config_values_found_by_fuzzing_are_clear_errors(tmp_path):
    """Each of these once escaped as a TypeError, OverflowError or YAMLError (exit 3, a traceback)."""
    base = {"model": {"path": "m.keras"}}
    cases = [
        {**base, "distill": {"temperature": 10**400}},  # an int beyond float's range
        {**base, "data": {"mean": [10**400]}},
        {**base, "max_drop": "nan"},  # nan as text passed the float check
        {**base, "data": {"std": "nan"}},
        {**base, "seed": -1},  # numpy and TensorFlow refuse it only when the run starts
        {**base, "seed": 2**64},
    ]
    for raw in cases:
        with pytest.raises(UsageError):
            config_from_dict(raw)
    with pytest.raises(UsageError, match="not valid YAML"):
        apply_overrides(base, ["prune.epochs=[1"])
    # a YAML date or binary value is a wrong type, named, not a crash of the JSON copy the loader made
    path = tmp_path / "date.yaml"
    path.write_text("name: 2024-01-01\nmodel: {path: m.keras}\n")
    with pytest.raises(UsageError, match="name: expected text"):
        load_config(str(path), ["prune.epochs=2"])
    # an empty section (null in YAML) takes overrides like an absent one
    path.write_text("model: {path: m.keras}\nprune:\n")
    cfg, _ = load_config(str(path), ["prune.epochs=2"])
    assert cfg.prune.epochs == 2
    assert config_from_dict({**base, "seed": 2**31 - 1}).seed == 2**31 - 1
    assert math.isinf(config_from_dict({**base, "max_drop": "inf"}).max_drop)

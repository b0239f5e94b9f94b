"""The Python API: build a model from a path or a proto in one call, and explain numpy arrays with it."""
from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from . import pipeline
from .errors import LrpError, LrpWarning
from .ir.files import load
from .lrp.composite import Composite, load_composite
from .lrp.rules import DEFAULTS, parse_value
from .lrp.seed import RELEVANCE, TARGET, Recorded, chosen_classes, explained_value

DEVICES = ("cpu", "cuda")
# TensorFloat-32 products (ONNX Runtime's CUDA default) round to 10 bits, which the stabilized divisions of LRP
# amplify (1e-3 to 1e-1 from the CPU's relevance on ResNet-50): float32 products keep CUDA's relevance the CPU's.
CUDA_OPTIONS = {"use_tf32": "0"}
# Metadata keys that exporters use for class names: a JSON list, a JSON object {"0": name}, or "a,b,c".
LABEL_KEYS = ("labels", "classes", "class_names", "id2label")


def build(model_or_path: onnx.ModelProto | str | Path, composite: str | Path | Composite = "epsilon_plus_flat",
          explain: str = "logit", output: str | None = None, source: str | None = None,
          layer_relevance: bool = False, input_shape: str | Sequence[str] | None = None, target_default: bool = True,
          position: int = -1, explain_input: str | None = None, fold_weights: bool = False,
          optimize_for: str | None = None, **rule_params: float | tuple[float, ...]) -> onnx.ModelProto:
    """The model with a `target` input and a `relevance` output. `composite` is a preset name, a TOML path or a
    Composite; `rule_params` (epsilon, gamma, alpha, beta, low, high, stabilizer, epsilon_scale) override the
    composite's; `layer_relevance` adds the relevance at the input of every linear layer as outputs;
    `input_shape` ("[NAME:]DIMS", or a list of them, one per input) fixes the sizes that model inputs leave open;
    `target_default=False` makes `target` a required input (for OpenVINO and TensorRT: see README). For a language
    model (logits [N, T, V]), `position` is the position explained by default (-1: the next token after each
    prompt), and `explain_input` names the input to explain where two token lookups could be meant.
    `fold_weights=True` stores the modified weights instead of computing them when a session starts (a larger file,
    a faster start: see README, Speed); `optimize_for="cpu"` returns ONNX Runtime's optimised model for this
    machine's CPU (the fastest start; a file for ONNX Runtime on this kind of CPU only)."""
    if isinstance(model_or_path, onnx.ModelProto):
        held, source, folder = [model_or_path], source or "model", None
    else:  # a model read here is handed over (held.pop()); its external weights are read by the graph alone
        held, source = [load(model_or_path, read_weights=False)], source or str(model_or_path)
        folder = Path(model_or_path).parent
    unknown = sorted(set(rule_params) - set(DEFAULTS))
    if unknown:
        raise LrpError(f"unknown rule parameter(s) {', '.join(unknown)} (parameters: {', '.join(DEFAULTS)})")
    overrides = {k: parse_value(k, list(v) if isinstance(v, tuple) else v, k)
                 for k, v in rule_params.items() if v is not None}
    chosen = composite if isinstance(composite, Composite) else load_composite(str(composite))
    return pipeline.build(held.pop(), chosen.with_params(overrides) if overrides else chosen, explain=explain,
                          output=output, source=source, layer_relevance=layer_relevance, input_shape=input_shape,
                          target_default=target_default, position=position, explain_input=explain_input,
                          fold_weights=fold_weights, optimize_for=optimize_for, weights_folder=folder)


def is_built(model: onnx.ModelProto) -> bool:
    """Whether the model already computes relevance (has the `relevance` output)."""
    return any(value.name == RELEVANCE for value in model.graph.output)


def open_session(model: onnx.ModelProto, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session that logs only errors (no warning about the `target` default) on the chosen
    device, with `threads` intra-op threads (None: ONNX Runtime's default, one per core); CUDA is requested only
    for device="cuda" and must really load."""
    if device not in DEVICES:
        raise LrpError(f"device must be one of {', '.join(DEVICES)} (got '{device}')")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if device == "cpu":
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise LrpError("--device cuda: this ONNX Runtime has no CUDA provider (install onnxruntime-gpu), "
                       "or use --device cpu")
    ort.set_default_logger_severity(4)  # a provider that fails to load logs its own lines; we say it once
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=[("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"])
    finally:
        ort.set_default_logger_severity(3)
    if "CUDAExecutionProvider" not in session.get_providers():
        raise LrpError("--device cuda: the CUDA provider of ONNX Runtime did not load (it needs an NVIDIA GPU and "
                       "the CUDA and cuDNN versions of its onnxruntime-gpu build); use --device cpu")
    return session


def with_outputs(model: onnx.ModelProto, names: list[str], source: str) -> onnx.ModelProto:
    """A copy of the model whose outputs include the internal tensors `names` (float, of the first output's type)."""
    declared = {o.name for o in model.graph.output}
    produced = {t for node in model.graph.node for t in node.output}
    missing = [n for n in names if n not in declared and n not in produced]
    if missing:
        raise LrpError(f"{source}: the recorded tensor(s) {', '.join(missing)} are not in the graph")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    elem_type = next(o.type.tensor_type.elem_type for o in model.graph.output if o.name == RELEVANCE)
    for name in dict.fromkeys(names):
        if name not in declared:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return copy


def fixed_batch(model_input: "ModelInput") -> int | None:
    """The batch size a model input is fixed to (exported with a batch of one, say), None when it is dynamic."""
    size = model_input.shape[0] if model_input.shape else None
    return size if isinstance(size, int) and size > 0 else None


def in_batches(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], feeds: Mapping[str, np.ndarray],
               size: int | None) -> list[np.ndarray]:
    """`run(feeds)` on a model that takes a fixed batch of `size` (None: any): the feeds (each with the batch on
    its first axis) in chunks of `size`, the last one padded with copies of its last sample, the outputs joined."""
    count = len(next(iter(feeds.values())))
    if size is None or count == size:
        return run(dict(feeds))
    parts = []
    for start in range(0, count, size):
        chunk = {name: value[start:start + size] for name, value in feeds.items()}
        taken = len(next(iter(chunk.values())))
        padded = {name: np.concatenate([value] + [value[-1:]] * (size - taken)) for name, value in chunk.items()}
        parts.append([output[:taken] for output in run(padded)])
    return [np.concatenate(outputs) for outputs in zip(*parts)]


def batch_note(source: str, size: int) -> str:
    """The one line that says a model with a fixed batch is fed in chunks."""
    return f"{source}: the model takes a fixed batch of {size}: its inputs run " + \
        ("one at a time" if size == 1 else f"{size} at a time")


def metadata_labels(model: onnx.ModelProto, classes: int) -> list[str] | None:
    """Class names stored in the model's metadata under one of LABEL_KEYS, if there are `classes` of them."""
    props = {p.key: p.value for p in model.metadata_props}
    for key in LABEL_KEYS:
        if key not in props:
            continue
        try:
            value = json.loads(props[key])
        except ValueError:
            value = [v.strip() for v in props[key].split(",")]
        if isinstance(value, dict):
            try:
                value = [value[k] for k in sorted(value, key=int)]
            except ValueError:
                continue
        if isinstance(value, list) and len(value) == classes:
            return [str(v) for v in value]
    return None


@dataclass(frozen=True)
class ModelInput:
    """The model input that files are read for: its name, shape (an int per fixed axis, a name or None where it
    is dynamic) and dtype."""
    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def shape_text(self) -> str:
        """The shape as users read it: [?, 3, 224, 224]."""
        return "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in self.shape) + "]"

    def fit(self, x: np.ndarray, where: str = "input") -> np.ndarray:
        """`x` as a batch of this input's dtype, or an LrpError naming the shape the model takes."""
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise LrpError(f"{where}: an array of {x.dtype} is not numeric")
        fits = x.ndim == len(self.shape) and all(not isinstance(d, int) or d == n
                                                 for d, n in zip(self.shape[1:], x.shape[1:]))
        if not fits:
            raise LrpError(f"{where}: shape {list(x.shape)} does not fit the model input '{self.name}' "
                           f"{self.shape_text}")
        return x.astype(self.dtype, copy=False)


@dataclass(frozen=True)
class Explanation:
    """One batch explained: the classifier output [N, C], the logits behind its head, the class explained and what
    the relevance is compared with (the seed's total: the logit, its log-odds or 1) per sample, the relevance."""
    output: np.ndarray
    logits: np.ndarray
    classes: np.ndarray
    values: np.ndarray
    relevance: np.ndarray


def built(path_or_model: onnx.ModelProto | str | Path, composite: str | Path | Composite | None = None,
          explain: str | None = None, default: str = "epsilon_plus_flat", source: str | None = None,
          **rule_params: float | tuple[float, ...]) -> tuple[onnx.ModelProto, str]:
    """A built model and the name messages give it (`source`, or the path): as read when it computes relevance
    already, else built with `composite` (or `default`); a composite, explain or rule parameters for a built model
    are refused."""
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else load(path_or_model)
    source = source or ("model" if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model))
    if not is_built(model):
        return build(model, composite or default, explain or "logit", source=source, **rule_params), source
    if composite is not None or explain is not None or rule_params:
        raise LrpError(f"{source}: already computes relevance; a composite, explain or rule parameters "
                       "apply to plain models only")
    return model, source


class BuiltModel:
    """A session of a built model, whatever its inputs, and the outputs read beside `relevance`: the classifier
    output [N, C] (`output`, holding what `shown` says: logits, or the probabilities of a softmax or sigmoid head)
    and the logits behind its head (`logits`, what is explained)."""

    def __init__(self, model: onnx.ModelProto, source: str, device: str = "cpu", threads: int | None = None):
        self.model = model
        self.source = source
        self.recorded = Recorded.of(model)  # what it explains (all None for models built before it was stored)
        produced = {o.name for o in model.graph.output} | {t for node in model.graph.node for t in node.output}
        extra = [n for n in (self.recorded.output, self.recorded.logits) if n is not None and n in produced]
        self.session = open_session(with_outputs(model, extra, source), device, threads)
        outputs = [o for o in self.session.get_outputs() if o.name != RELEVANCE]
        chosen = self.recorded.output if self.recorded.output in extra else None
        scores = next((o for o in outputs if o.type in _NUMPY_TYPES and len(o.shape) == 2
                       and (chosen is None or o.name == chosen)), None)
        if scores is None or not isinstance(scores.shape[1], int):
            raise LrpError(f"{source}: no output of shape [N, C] among {', '.join(o.name for o in outputs)}")
        self.output: str = scores.name
        self.shown: str = self.recorded.shown if chosen is not None else "logit"
        self.logits: str = self.recorded.logits if self.recorded.logits in extra else scores.name
        self.classes: int = scores.shape[1]

    def run(self, feeds: Mapping[str, np.ndarray], chosen: np.ndarray, batch: int | None = None) -> Explanation:
        """The model on `feeds` (every input but `target`) for the classes `chosen` (negative: the predicted one), in
        chunks of `batch` when the model takes a fixed batch."""
        names, quiet = [self.output, self.logits, RELEVANCE], ort.RunOptions()
        quiet.log_severity_level = 4  # a failure raises; ONNX Runtime need not log it as well
        output, logits, relevance = in_batches(lambda chunk: self.session.run(names, chunk, quiet),
                                               {**feeds, TARGET: chosen}, batch)
        classes = np.where(chosen < 0, logits.argmax(axis=1), chosen)
        values = np.array([explained_value(self.recorded.explain, row, int(c))[1] for row, c in zip(logits, classes)])
        return Explanation(output, logits, classes, values, relevance)


class Explainer:
    """Runs a built model (or builds a plain one first) on numpy arrays and returns logits and relevance.

    >>> explainer = Explainer("model_lrp.onnx")
    >>> logits, relevance = explainer.explain(x)            # x: a batch shaped like the model input

    `threads` sets ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    def __init__(self, path_or_model: onnx.ModelProto | str | Path, device: str = "cpu",
                 composite: str | Path | Composite | None = None, explain: str | None = None,
                 threads: int | None = None, **rule_params: float | tuple[float, ...]):
        model, source = built(path_or_model, composite, explain, **rule_params)
        self.built = BuiltModel(model, source, device, threads)
        self.rate = Rate()  # of the last stream
        self.model, self.source, self.recorded, self.session = model, source, self.built.recorded, self.built.session
        inputs = [i for i in self.session.get_inputs() if i.name != TARGET]
        if len(inputs) != 1:
            raise LrpError(f"{source}: Explainer takes models with one input (this one has "
                           f"{', '.join(i.name for i in inputs)})")
        self.input = ModelInput(inputs[0].name, tuple(inputs[0].shape),
                                np.dtype(_NUMPY_TYPES.get(inputs[0].type, np.float32)))
        self.logits_name: str = self.built.output  # the classifier output (probabilities when the model outputs them)
        self.shown: str = self.built.shown
        self.explained_name: str = self.built.logits
        self.classes: int = self.built.classes
        self.labels: list[str] | None = metadata_labels(self.model, self.classes)
        self.batch: int | None = fixed_batch(self.input)
        self._noted = False

    @property
    def input_name(self) -> str:
        """The name the model input is fed under."""
        return self.input.name

    @property
    def input_shape(self) -> list[int | str | None]:
        """The model input's shape: an int per fixed axis, a name or None where it is dynamic."""
        return list(self.input.shape)

    def check_input(self, x: np.ndarray, where: str = "input") -> np.ndarray:
        """`x` as a batch of the model's input type, or an LrpError naming the shape the model takes."""
        return self.input.fit(x, where)

    def check_target(self, target: int | np.ndarray | None, batch: int) -> np.ndarray:
        """One class per sample (negative: the predicted class); an LrpError for classes out of range."""
        return chosen_classes(target, batch, self.classes)

    def explain(self, x: np.ndarray, target: int | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The classifier output [N, C] (logits, or the probabilities a model with a softmax or sigmoid head
        outputs) and relevance (x's shape) of the batch `x` for class `target` (an int for all samples, one per
        sample, or None / negative for the predicted class)."""
        explanation = self.explanation(x, target)
        return explanation.output, explanation.relevance

    def explanation(self, x: np.ndarray, target: int | np.ndarray | None = None) -> Explanation:
        """`explain` with the logits, the class explained and the value the relevance is compared with. A model
        with a fixed batch size runs in chunks of that size (said once, as an LrpWarning)."""
        x = self.check_input(x)
        chosen = self.check_target(target, len(x))
        if self.batch is not None and len(x) != self.batch and not self._noted:
            warnings.warn(batch_note(self.source, self.batch), LrpWarning, stacklevel=2)
            self._noted = True
        return self.built.run({self.input_name: x}, chosen, self.batch)

    def stream(self, batches: Iterable[np.ndarray], target: int | np.ndarray | None = None
               ) -> Iterator[Explanation]:
        """`explanation` of each batch that `batches` yields, in order. The next batch is read (decoded,
        preprocessed: whatever the iterable does) in a second thread while ONNX Runtime explains this one, which
        releases the interpreter lock while it runs. `rate` holds the samples explained and the seconds taken."""
        self.rate = Rate()
        started = time.perf_counter()
        source = iter(batches)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxlrp-reader") as reader:
            ahead = reader.submit(next, source, None)
            while (x := ahead.result()) is not None:
                ahead = reader.submit(next, source, None)
                explanation = self.explanation(x, target)
                self.rate = Rate(self.rate.samples + len(x), time.perf_counter() - started)
                yield explanation

    def label(self, index: int) -> str | None:
        return self.labels[index] if self.labels else None


@dataclass(frozen=True)
class Rate:
    """How many samples a stream explained, in how many seconds (from its start to its last explanation)."""
    samples: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def line(self, what: str = "input(s)") -> str:
        return f"explained {self.samples} {what} in {self.seconds:.3g} s ({self.per_second:.3g} per second)"


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}

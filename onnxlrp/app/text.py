"""`onnxlrp explain MODEL --text ... --tokenizer tokenizer.json`: texts through a Hugging Face tokenizer into a text
model's token inputs, and its relevance per token printed (coloured on a terminal) and written as an HTML page and a
JSON file per text.

The model's inputs are fed by name: the token ids (the integer input looked up in the largest embedding table), and
what the tokenizer gives for `*mask*` (attention mask), `*type*` (token types) and `*position*` inputs. Batches are
padded as the tokenizer's padding settings say, or with its pad token when it has none set.
"""
from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from ..api import BuiltModel, ModelInput, batch_note, built, fixed_batch, metadata_labels
from ..errors import LrpError, LrpWarning, printable
from ..ir.files import first_line, load
from ..lrp.seed import TARGET, chosen_classes
from .explain import Staging, chosen_target, labelled_target, read_labels
from .inputs import token_tables

INSTALL = "pip install 'onnxlrp[text]'"
# Pad tokens looked for when the tokenizer has no padding settings (BERT's, T5's and some LLMs').
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")
# What a model input that is not the token ids gets, by a word in its name: the attention mask, token types,
# positions (counted over the tokens the mask keeps, as Hugging Face models count them).
FED = {
    "mask": lambda tokens: tokens.mask,
    "type": lambda tokens: tokens.types,
    "position": lambda tokens: np.maximum(np.cumsum(tokens.mask, axis=1) - 1, 0),
}
COLORS = ("auto", "always", "never")
# The colours of relevance: red for the explained class, blue against it, white for none.
FOR, AGAINST = (220, 38, 38), (37, 99, 235)


@dataclass(frozen=True)
class Text:
    """One text to explain: its output stem, where it was given (for messages) and the text."""
    stem: str
    source: str
    text: str


def gather_texts(given: Sequence[str], files: Sequence[str]) -> list[Text]:
    """The texts of `--text` (stems text-0, text-1, ...) then the lines of each `--text-file` (blank lines skipped;
    stems FILE-0, FILE-1, ...). Empty texts and colliding stems are refused."""
    items = [Text(f"text-{k}", f"--text {k + 1}", text) for k, text in enumerate(given)]
    for name in files:
        path = Path(name)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise LrpError(f"{path}: cannot read the texts ({getattr(error, 'strerror', None) or error})") from None
        kept = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
        if not kept:
            raise LrpError(f"{path}: no text in this file (one text per line)")
        items += [Text(f"{path.stem}-{k}", f"{path} line {number}", line) for k, (number, line) in enumerate(kept)]
    seen: dict[str, str] = {}
    for item in items:
        if not item.text.strip():
            raise LrpError(f"{item.source}: the text is empty")
        if item.stem in seen:
            raise LrpError(f"{item.source}: its output name '{item.stem}' is taken by {seen[item.stem]}; "
                           "rename the file")
        seen[item.stem] = item.source
    return items


def load_tokenizer(path: str) -> Any:
    """A `tokenizers.Tokenizer` from its JSON file (the `text` extra installs the library)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LrpError(f"--tokenizer needs the Hugging Face tokenizers library: {INSTALL}") from None
    if not Path(path).is_file():
        raise LrpError(f"{path}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises its own exception types
        raise LrpError(f"{path}: not a tokenizer file of the tokenizers library ({first_line(error)})") from None


@dataclass(frozen=True)
class Tokens:
    """A batch of encoded texts padded to one length: ids, attention mask and token types [N, T], and per text its
    tokens and their character offsets in the text."""
    ids: np.ndarray
    mask: np.ndarray
    types: np.ndarray
    tokens: list[list[str]]
    offsets: list[list[tuple[int, int]]]


class TextModel:
    """A built text model (a plain one is built first), its token inputs and the tokenizer that feeds them."""

    def __init__(self, model_path: str, tokenizer_path: str, device: str = "cpu", composite: str | None = None,
                 labels_file: str | None = None):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.tokenizer_path = tokenizer_path
        plain = load(model_path)  # its token inputs are checked before a plain model is built
        tables = token_tables(plain)
        if not tables:
            raise LrpError(f"{model_path}: no token-id input (an integer input looked up in an embedding table): "
                           "--text explains text models")
        ids = max(tables, key=tables.get)
        inputs = {i.name: i for i in plain.graph.input}
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in inputs[ids].type.tensor_type.shape.dim)
        self.ids = ModelInput(ids, dims, onnx.helper.tensor_dtype_to_np_dtype(inputs[ids].type.tensor_type.elem_type))
        defaults = {t.name for t in plain.graph.initializer} | {TARGET, ids}
        self.fed: dict[str, str] = {}
        for name in (n for n in inputs if n not in defaults):
            word = next((w for w in FED if w in name.lower()), None)
            if word is None:
                raise LrpError(f"{model_path}: input '{name}' is not one that texts feed (token ids '{ids}', "
                               "attention mask, token types, positions)")
            self.fed[name] = word
        vocabulary = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocabulary > tables[ids]:
            raise LrpError(f"{tokenizer_path}: {vocabulary} tokens, more than the {tables[ids]} rows of the embedding "
                           f"table of '{ids}' in {model_path}: not this model's tokenizer")
        model, self.source = built(plain, composite, default="attnlrp", source=model_path)
        self.built = BuiltModel(model, self.source, device)
        self.classes = self.built.classes
        # A vocabulary-sized output (a language model's next token) is named by tokens, a classifier's by labels.
        self.vocabulary = self.classes >= vocabulary
        self.labels = read_labels(labels_file, self.classes) if labels_file else metadata_labels(model, self.classes)
        self.batch = fixed_batch(self.ids)
        self.length = self.ids.shape[1] if len(self.ids.shape) == 2 and isinstance(self.ids.shape[1], int) else None
        self._pad()

    def _pad(self) -> None:
        """Padding as the tokenizer says, or with its pad token; to the model's sequence length when it is fixed."""
        settings = self.tokenizer.padding
        if settings is None:
            pad = next((t for t in PAD_TOKENS if self.tokenizer.token_to_id(t) is not None), None)
            if pad is None:
                return
            settings = {"pad_id": self.tokenizer.token_to_id(pad), "pad_token": pad}
        keys = ("direction", "pad_id", "pad_type_id", "pad_token", "pad_to_multiple_of")
        self.tokenizer.enable_padding(**{k: settings[k] for k in keys if settings.get(k) is not None},
                                      length=self.length or settings.get("length"))

    def target(self, target: str | None) -> int | None:
        """The class `--target` names: a class name (labels) or, for a vocabulary-sized output, a token; else a
        number."""
        if self.vocabulary:
            return chosen_target(target, self.classes, self.tokenizer.token_to_id, "a token of the tokenizer")
        return labelled_target(target, self.classes, self.labels)

    def name(self, index: int) -> str | None:
        """What users call class `index`: its label, or for a vocabulary-sized output its token."""
        if self.vocabulary:
            return self.tokenizer.id_to_token(index)
        return self.labels[index] if self.labels else None

    def named(self, index: int) -> str:
        """Class `index` as lines and pages show it: its number, then its name in brackets when it has one."""
        name = self.name(index)
        return str(index) if name is None else f"{index} ({name})"

    def encode(self, items: Sequence[Text]) -> Tokens:
        """The texts as one padded batch, or an LrpError for a text the model cannot take."""
        encodings = self.tokenizer.encode_batch([item.text for item in items])
        for item, encoding in zip(items, encodings):
            if self.length is not None and len(encoding.ids) > self.length:
                raise LrpError(f"{item.source}: {len(encoding.ids)} tokens, more than the {self.length} the model "
                               "takes")
        if len({len(e.ids) for e in encodings} | ({self.length} if self.length else set())) > 1:
            raise LrpError(f"{self.tokenizer_path}: has no padding settings nor a pad token "
                           f"({', '.join(PAD_TOKENS)}), so texts of other lengths than "
                           + (f"the model's {self.length} tokens cannot be fed" if self.length else
                              "each other's cannot share a batch: give --batch-size 1"))
        as_array = lambda name: np.array([getattr(e, name) for e in encodings], dtype=self.ids.dtype)  # noqa: E731
        return Tokens(as_array("ids"), as_array("attention_mask"), as_array("type_ids"),
                      [e.tokens for e in encodings], [list(e.offsets) for e in encodings])

    def feeds(self, tokens: Tokens) -> dict[str, np.ndarray]:
        """The model's inputs (all but `target`) for a batch of tokens."""
        return {self.ids.name: tokens.ids, **{name: FED[word](tokens).astype(self.ids.dtype)
                                              for name, word in self.fed.items()}}


@dataclass
class TextResult:
    """What one text gave: its tokens (padding left out), their ids, offsets and relevance, the classifier output
    row, the class explained, its logit and the value the relevance is compared with."""
    text: Text
    tokens: list[str]
    ids: list[int]
    offsets: list[tuple[int, int]]
    relevance: np.ndarray
    output: np.ndarray
    explained: int
    logit: float
    value: float

    @property
    def total(self) -> float:
        return float(self.relevance.sum(dtype=np.float64))

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.output))


def run(model: TextModel, items: Sequence[Text], target: int | None, batch_size: int) -> Iterator[TextResult]:
    """Explain the texts batch by batch (padded per batch), for `target` or each one's predicted class."""
    if model.batch is not None and model.batch != min(batch_size, len(items)):
        warnings.warn(batch_note(model.source, model.batch), LrpWarning)
    for start in range(0, len(items), batch_size):
        group = items[start:start + batch_size]
        tokens = model.encode(group)
        try:
            found = model.built.run(model.feeds(tokens), chosen_classes(target, len(group), model.classes),
                                    model.batch)
        except LrpError:
            raise
        except Exception as error:  # onnxruntime raises several types
            longest = int(tokens.mask.sum(axis=1).max())
            raise LrpError(f"{model.source}: could not run on {group[0].source}"
                           f"{f' to {group[-1].source}' if len(group) > 1 else ''} (up to {longest} tokens): "
                           f"{first_line(error)}") from None
        for k, item in enumerate(group):
            kept = np.flatnonzero(tokens.mask[k])
            explained = int(found.classes[k])
            yield TextResult(item, [tokens.tokens[k][i] for i in kept], tokens.ids[k, kept].tolist(),
                             [tokens.offsets[k][i] for i in kept], found.relevance[k, kept], found.output[k],
                             explained, float(found.logits[k, explained]), float(found.values[k]))


def shade(value: float, scale: float) -> tuple[int, int, int]:
    """The colour of a relevance `value` normalised by `scale` (the largest magnitude): white to red for, white to
    blue against."""
    weight = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    end = FOR if value > 0 else AGAINST
    return tuple(round(255 + weight * (c - 255)) for c in end)


def describe(result: TextResult, model: TextModel, color: bool) -> str:
    """Two lines for one text: the predicted and explained class, the classifier output there and the relevance
    sum; then every token with its relevance (coloured on a terminal)."""
    line = (f"{result.text.stem}: predicted {model.named(result.predicted)}, "
            f"explained {model.named(result.explained)}, "
            f"{model.built.shown} {result.output[result.explained]:.6g}, relevance sum {result.total:.6g}")
    scale = float(np.abs(result.relevance).max()) if result.relevance.size else 0.0
    shown = []
    for token, value in zip(result.tokens, result.relevance):
        token = printable(token)
        if color:
            r, g, b = shade(float(value), scale)
            token = f"\x1b[30;48;2;{r};{g};{b}m{token}\x1b[0m"
        shown.append(f"{token} {value:+.4g}")
    return printable(line) + "\n  " + "  ".join(shown)


def page(result: TextResult, model: TextModel) -> str:
    """A self-contained HTML page: the text with each token's characters highlighted (red for, blue against,
    normalised by the largest magnitude), special tokens shown apart, and a table of the numbers."""
    text, scale = result.text.text, float(np.abs(result.relevance).max()) if result.relevance.size else 0.0
    parts, cursor = [], 0
    for token, (start, end), value in zip(result.tokens, result.offsets, result.relevance):
        inside = end > start and start >= cursor
        if inside:
            parts.append(html.escape(text[cursor:start]))
            cursor = end
        r, g, b = shade(float(value), scale)
        parts.append(f'<span class="{"t" if inside else "t special"}" style="background:rgb({r},{g},{b})" '
                     f'title="{html.escape(token)} {value:+.6g}">{html.escape(text[start:end] if inside else token)}'
                     "</span>")
    parts.append(html.escape(text[cursor:]))
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{i}</td><td>{v:+.6g}</td></tr>"
                   for t, i, v in zip(result.tokens, result.ids, result.relevance))
    title = html.escape(f"{result.text.stem}: explained {model.named(result.explained)}, "
                        f"predicted {model.named(result.predicted)}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
.text{{font-size:1.3em;line-height:2em;white-space:pre-wrap}}
.t{{padding:0.1em 0.05em;border-radius:0.2em}} .special{{font-size:0.7em;margin:0 0.3em;border:1px solid #888}}
table{{border-collapse:collapse}} td{{padding:0.1em 0.8em;font-family:monospace}}</style></head>
<body><h1>{title}</h1>
<p>{html.escape(model.built.shown)} {result.output[result.explained]:.6g}, relevance sum {result.total:.6g}
(red: for the explained class, blue: against; largest magnitude {scale:.6g}).</p>
<p class="text">{"".join(parts)}</p>
<table><tr><th>token</th><th>id</th><th>relevance</th></tr>{rows}</table>
</body></html>
"""


def record(result: TextResult, model: TextModel) -> dict:
    """The numbers of one text, as its JSON file holds them."""
    return {"text": result.text.text, "tokens": result.tokens, "ids": result.ids,
            "offsets": [list(o) for o in result.offsets], "relevance": result.relevance.astype(float).tolist(),
            "predicted": {"index": result.predicted, "name": model.name(result.predicted)},
            "explained": {"index": result.explained, "name": model.name(result.explained)},
            "logit": result.logit, "relevance_sum": result.total}


def explain_texts(model_path: str, tokenizer_path: str, texts: Sequence[str], text_files: Sequence[str], outdir: str,
                  *, target: str | None = None, batch_size: int = 16, device: str = "cpu",
                  labels_file: str | None = None, composite: str | None = None, color: bool = False) -> list[str]:
    """`explain --text`: check everything, explain the texts, move STEM.html and STEM.json per text into `outdir`;
    return what to print per text."""
    items = gather_texts(texts, text_files)
    model = TextModel(model_path, tokenizer_path, device, composite, labels_file)
    chosen = model.target(target)
    staging = Staging(Path(outdir))
    lines, totals, values = [], [], []
    try:
        for result in run(model, items, chosen, batch_size):
            (staging.folder / f"{result.text.stem}.html").write_text(page(result, model), encoding="utf-8")
            (staging.folder / f"{result.text.stem}.json").write_text(json.dumps(record(result, model), indent=1),
                                                                     encoding="utf-8")
            lines.append(describe(result, model, color))
            totals.append(result.total)
            values.append(result.value)
        staging.commit()
    finally:
        staging.discard()
    inflation = model.built.recorded.inflation(totals, values)
    if inflation is not None:
        warnings.warn(f"{model_path}: {inflation}", LrpWarning)
    return lines

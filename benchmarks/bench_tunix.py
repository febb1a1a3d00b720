"""``fw_jax.prune`` on Tunix's Llama 3 against the ``fw-jax prune`` engine on fw_jax's own LLaMA.

One set of weights, two models: SmolLM2-135M (the GGUF that fw_jax ships, dequantized to float32)
is written as a Hugging Face safetensors folder by fw_jax, then loaded twice: into Tunix's
``Llama3`` (``tunix.models.llama3.params.create_model_from_safe_tensors``) and into fw_jax's
``LlamaForCausalLM`` (``fw_jax.models.load_model``). The two models' logits are compared on a few
windows first. Then, for each method, in one run and on the same calibration tokens:

- ``fw_jax.prune(tunix_model, batches, forward=...)``: the traced front-end on Tunix's einsum
  kernels (``(D, N, H)`` queries, ``(N, H, D)`` output, ``nnx.Linear`` MLP);
- ``fw_jax.pipeline.prune_model(loaded, tokens, settings)``: the engine of ``fw-jax prune`` on
  fw_jax's model.

Each pruning runs in a fresh subprocess (its own compilations, its own peak RSS), timed in wall
seconds with compilation included. Tunix's kernels are mapped back to Hugging Face's
``(d_out, d_in)`` weights and the two masks compared entry by entry; where Wanda's masks differ,
each differing pair of entries is checked to be a float tie: its two scores ``|W_ij| ‖x_j‖``
(each run with its own Gram diagonal) closer than the two runs' Gram diagonals differ. Perplexity
of both pruned models on pydoc-eval: fw_jax's evaluator (``fw_jax.models.perplexity``) for
fw_jax's model, a cross-entropy written here in numpy from Tunix's logits for Tunix's.

Tunix 0.1.7's attention calls ``apply_rope`` without the config's ``rope_theta`` (it always
uses 1,000,000); SmolLM2's is 100,000, so the run sets ``apply_rope``'s default to the config's
value and reports the logits' difference with and without that fix. Writes ``results/tunix.md``::

    python benchmarks/bench_tunix.py                  # SmolLM2-135M
    python benchmarks/bench_tunix.py --tiny           # a tiny random LLaMA, seconds (the tests)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("wanda", "sparsefw")
SPARSITY = 0.5
BATCH = 4  # calibration windows per forward pass, both runs
_KEY = re.compile(r"layers[._](\d+)\..*?(" + "|".join(PROJS) + r")")


def _key(name: str):
    """``(block, projection)`` of a layer or parameter name of either model, or None."""
    m = _KEY.search(name)
    return None if m is None else (int(m.group(1)), m.group(2))


# --- the weights ---------------------------------------------------------------------------------

def llama_shapes(d: int, f: int, heads: int, kv: int, hd: int, layers: int, vocab: int) -> dict:
    """``{tensor name: shape}`` of a Hugging Face LLaMA with tied embeddings (the tiny benchmark models)."""
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    for b in range(layers):
        p = f"model.layers.{b}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (heads * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, heads * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return shapes


def _write_tiny_llama(folder: pathlib.Path) -> None:
    """A random 2-block LLaMA (tied embeddings, grouped-query attention) as a Hugging Face folder."""
    from safetensors.numpy import save_file

    d, f, heads, kv, hd, vocab, layers = 64, 96, 4, 2, 16, 101, 2
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": f, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
              "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    rng = np.random.default_rng(0)
    shapes = llama_shapes(d, f, heads, kv, hd, layers, vocab)
    tensors = {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.2 * rng.standard_normal(s)).astype(np.float32)
               for n, s in shapes.items()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _tunix_config(folder: pathlib.Path):
    """Tunix's ``llama3.ModelConfig`` for the LLaMA folder, refusing what Tunix's Llama 3 lacks."""
    from tunix.models.llama3 import model as llama3

    c = json.loads((folder / "config.json").read_text())
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
    problems = [what for what, bad in [
        (f"model_type {c.get('model_type')!r} (expected 'llama')", c.get("model_type") != "llama"),
        ("attention or MLP biases", c.get("attention_bias") or c.get("mlp_bias")),
        (f"rope_type {rope.get('rope_type')!r} (Tunix's Llama 3 has only plain RoPE)",
         rope.get("rope_type", "default") != "default")] if bad]
    if problems:
        raise ValueError(f"{folder / 'config.json'}: Tunix's Llama 3 cannot run this model: {'; '.join(problems)}")
    heads = c["num_attention_heads"]
    return llama3.ModelConfig(
        num_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"], num_heads=heads, head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        num_kv_heads=c.get("num_key_value_heads", heads), rope_theta=rope["rope_theta"],
        norm_eps=c["rms_norm_eps"], weight_tying=bool(c.get("tie_word_embeddings", False)))


def _use_config_rope_theta(theta) -> None:
    """Make Tunix's ``apply_rope`` default to the model's ``rope_theta`` (its attention passes none)."""
    from tunix.models.llama3 import model as llama3

    original = getattr(llama3.apply_rope, "func", llama3.apply_rope)
    llama3.apply_rope = functools.partial(original, rope_theta=theta)


def _load_tunix(folder: pathlib.Path):
    import jax.numpy as jnp
    from tunix.models.llama3 import params

    return params.create_model_from_safe_tensors(str(folder), _tunix_config(folder), dtype=jnp.float32)


def tunix_forward(model, tokens):
    """Tunix's Llama 3 on ``(B, T)`` tokens: causal, no cache; returns ``(logits, cache)``."""
    import jax.numpy as jnp

    t = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
    return model(tokens, positions, None, mask)


def _tunix_logits(model, windows: np.ndarray) -> np.ndarray:
    from flax import nnx

    step = nnx.jit(lambda m, x: tunix_forward(m, x)[0])
    return np.concatenate([np.asarray(step(model, windows[i:i + BATCH]), np.float32)
                           for i in range(0, len(windows), BATCH)])


def _tunix_weights(model) -> dict:
    """Tunix's block kernels as Hugging Face's ``(d_out, d_in)`` weights, by ``(block, projection)``."""
    out = {}
    for b, layer in enumerate(model.layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            w = np.asarray(getattr(layer.attn, p).w.value)  # (D, N, H)
            out[(b, p)] = w.reshape(w.shape[0], -1).T
        w = np.asarray(layer.attn.o_proj.w.value)  # (N, H, D)
        out[(b, "o_proj")] = w.reshape(-1, w.shape[-1]).T
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[(b, p)] = np.asarray(getattr(layer.mlp, p).kernel.value).T  # (in, out)
    return out


def _fw_jax_weights(loaded) -> dict:
    from fw_jax.models._shards import tensor_items

    return {_key(name): get() for name, _, _, get in tensor_items(loaded) if _key(name) is not None}


def _folder_weights(folder: pathlib.Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({_key(n): v.astype(np.float32) for n, v in load_file(str(f)).items()
                    if _key(n) is not None and n.endswith("proj.weight")})
    return out


# --- one pruning, in its own process -------------------------------------------------------------

def _child(job: str, method: str, work: pathlib.Path, max_iter: int, seqlen: int) -> dict:
    import fw_jax
    import fw_jax.pipeline.prune as engine
    from fw_jax import SolverOptions
    from fw_jax.pipeline import PruneSettings, prune_model

    calib, evaluation = np.load(work / "calib.npy"), np.load(work / "eval.npy")
    options = {"options": SolverOptions(max_iter=max_iter)} if method == "sparsefw" else {}
    diagonals, original = {}, engine._prune_named

    def recording(name, weight, gram, *args, **kwargs):  # each layer's Gram diagonal, for the tie check
        diagonals[_key(name)] = np.diag(np.asarray(gram, np.float64))
        return original(name, weight, gram, *args, **kwargs)

    engine._prune_named = recording
    folder = work / "model"
    if job == "tunix":
        model = _load_tunix(folder)
        _use_config_rope_theta(model.config.rope_theta)
        rss_loaded = _peak_rss_gb()
        start = time.perf_counter()
        report = fw_jax.prune(model, [calib[i:i + BATCH] for i in range(0, len(calib), BATCH)],
                              forward=tunix_forward, method=method, sparsity=SPARSITY, progress=False, **options)
        seconds = time.perf_counter() - start
        weights = _tunix_weights(model)
        ppl = _numpy_perplexity(_tunix_logits(model, _windows(evaluation, seqlen)), _windows(evaluation, seqlen))
    else:
        from fw_jax.models import load_model, perplexity

        loaded = load_model(str(folder), dtype="float32")
        rss_loaded = _peak_rss_gb()
        settings = PruneSettings.from_options(method, sparsity=SPARSITY, **options)
        start = time.perf_counter()
        report = prune_model(loaded, calib, settings, progress=False)
        seconds = time.perf_counter() - start
        weights = _fw_jax_weights(loaded)
        ppl = perplexity(loaded, evaluation, seqlen, batch_size=BATCH)
    errors = {"|".join(map(str, _key(r["name"]))): float(r["error"]) for r in report.layers
              if _key(r["name"]) is not None and r.get("error") is not None}
    np.savez(work / f"{job}-{method}.npz",
             **{f"mask|{b}|{p}": np.packbits(w != 0) for (b, p), w in weights.items()},
             **{f"diag|{b}|{p}": d for (b, p), d in diagonals.items() if (b, p) in weights})
    return {"job": job, "method": method, "seconds": seconds, "peak_rss_gb": _peak_rss_gb(),
            "rss_after_load_gb": rss_loaded, "ppl": ppl, "layers": len(report.layers), "errors": errors}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB → GB


def _windows(ids: np.ndarray, seqlen: int) -> np.ndarray:
    n = len(ids) // seqlen
    return np.asarray(ids[:n * seqlen], np.int32).reshape(n, seqlen)


def _numpy_perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
    """exp(mean next-token cross-entropy), in float64 numpy, of every window's tokens 2..T."""
    z = logits[:, :-1].astype(np.float64)
    top = z.max(-1, keepdims=True)
    log_norm = top[..., 0] + np.log(np.exp(z - top).sum(-1))
    target = np.take_along_axis(z, windows[:, 1:, None].astype(np.int64), -1)[..., 0]
    return float(np.exp(np.mean(log_norm - target)))


# --- comparing -----------------------------------------------------------------------------------

def _compare(work: pathlib.Path, method: str, original: dict) -> dict:
    """Mask entries that differ between the two runs, and whether each differing row is a float tie.

    Calibration is sequential, so once a block's masks differ, every later block is calibrated on
    different inputs and its masks may differ for that reason alone: the first block with a
    difference is reported apart (its inputs differ only by float rounding)."""
    runs = {job: np.load(work / f"{job}-{method}.npz") for job in ("tunix", "engine")}
    total = differing = 0
    layers_differing, first_block, first = [], None, {"rows": 0, "ties": 0, "entries": 0, "noise": 0.0, "layers": []}
    later = {"rows": 0, "ties": 0}
    for key in sorted(original):
        w = np.abs(original[key])
        tag = f"{key[0]}|{key[1]}"
        masks = {job: np.unpackbits(r[f"mask|{tag}"])[:w.size].reshape(w.shape).astype(bool) for job, r in runs.items()}
        diff = masks["tunix"] != masks["engine"]
        total += w.size
        count = int(diff.sum())
        if not count:
            continue
        differing += count
        layers_differing.append(f"{key[0]}.{key[1]}: {count}")
        first_block = key[0] if first_block is None else first_block
        scale = {job: np.sqrt(r[f"diag|{tag}"]) for job, r in runs.items()}
        noise = float(np.max(np.abs(scale["tunix"] - scale["engine"]) / np.maximum(scale["engine"], 1e-30)))
        tolerance = 2 * noise + 8 * np.finfo(np.float32).eps
        bucket = first if key[0] == first_block else later
        if key[0] == first_block:
            first["entries"] += count
            first["noise"] = max(first["noise"], noise)
            first["layers"].append(f"{key[1]}: {count}")
        for i in np.flatnonzero(diff.any(1)):
            score = w[i] * scale["engine"]
            kept_by_engine = score[masks["engine"][i] & ~masks["tunix"][i]]
            kept_by_tunix = score[masks["tunix"][i] & ~masks["engine"][i]]
            # the engine kept kept_by_engine over kept_by_tunix: a tie if their scores are within the noise
            gap = (kept_by_engine.max() - kept_by_tunix.min()) / max(kept_by_engine.max(), 1e-30)
            bucket["rows"] += 1
            bucket["ties"] += int(gap <= tolerance)
            bucket["gap"] = max(bucket.get("gap", 0.0), float(gap))
    return {"entries": total, "differing": differing, "identical": 1 - differing / total,
            "layers_differing": layers_differing, "first_block": first_block, "first": first, "later": later}


def _logits_check(work: pathlib.Path, seqlen: int) -> dict:
    """Largest |logit difference| between Tunix's and fw_jax's models on the first eval windows,
    with Tunix's RoPE as shipped and with the config's ``rope_theta``."""
    import jax.numpy as jnp

    from fw_jax.models import load_model
    from fw_jax.models._calibration import logits

    from fw_jax.models import perplexity

    evaluation = np.load(work / "eval.npy")
    windows = _windows(evaluation, seqlen)[:2]
    loaded = load_model(str(work / "model"), dtype="float32", tokenizer=False)
    ours = np.asarray(logits(loaded.model, jnp.asarray(windows)), np.float32)
    dense_fw_jax = perplexity(loaded, evaluation, seqlen, batch_size=BATCH)
    del loaded
    tunix = _load_tunix(work / "model")
    shipped = _tunix_logits(tunix, windows)
    _use_config_rope_theta(tunix.config.rope_theta)
    fixed = _tunix_logits(tunix, windows)
    every = _windows(evaluation, seqlen)
    dense_tunix = _numpy_perplexity(_tunix_logits(tunix, every), every)
    return {"windows": len(windows), "max_abs": float(np.abs(fixed - ours).max()),
            "dense_tunix": dense_tunix, "dense_fw_jax": dense_fw_jax,
            "scale": float(np.abs(ours).max()), "max_abs_shipped_rope": float(np.abs(shipped - ours).max())}


# --- the run ---------------------------------------------------------------------------------------

def _tokens(args, work: pathlib.Path) -> str:
    """Write the calibration and evaluation tokens both runs read; say what they are."""
    if args.tiny:
        rng = np.random.default_rng(1)
        vocab = json.loads((work / "model" / "config.json").read_text())["vocab_size"]
        np.save(work / "calib.npy", rng.integers(0, vocab, (args.nsamples, args.seqlen)).astype(np.int32))
        np.save(work / "eval.npy", rng.integers(0, vocab, args.eval_windows * args.seqlen).astype(np.int32))
        return "random tokens"
    from fw_jax.models import load_model
    from fw_jax.pipeline.data import calibration_tokens, evaluation_tokens, load_documents, needs_bos_per_window

    loaded = load_model(str(work / "model"), dtype="float32")
    if needs_bos_per_window(loaded):
        raise ValueError("this benchmark's numpy perplexity has no BOS per window; the model needs one")
    calib = calibration_tokens(loaded.tokenizer, load_documents("pydoc-calib"), args.nsamples, args.seqlen, seed=0)
    evaluation = evaluation_tokens(loaded.tokenizer, load_documents("pydoc-eval"))[:args.eval_windows * args.seqlen]
    np.save(work / "calib.npy", calib)
    np.save(work / "eval.npy", evaluation)
    return "pydoc-calib (calibration, `calibration_tokens`, seed 0), pydoc-eval (perplexity)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA (seconds), for the tests")
    p.add_argument("--model", default="smollm2-135m", help="what fw_jax.models.load_model reads (a LLaMA)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (calibration and perplexity)")
    p.add_argument("--eval-windows", type=int, default=8, help="perplexity windows of pydoc-eval")
    p.add_argument("--max-iter", type=int, default=20, help="sparsefw's SolverOptions(max_iter=...)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--out", default=str(ROOT / "results" / "tunix.md"))
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # job method work_dir
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: comma-separated names of {', '.join(METHODS)}; got {args.methods!r}")
    if args.child:
        job, method, work = args.child
        print(json.dumps(_child(job, method, pathlib.Path(work), args.max_iter, args.seqlen)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_tunix-") as tmp:
        work = pathlib.Path(tmp)
        if args.tiny:
            _write_tiny_llama(work / "model")
            source = "a random 2-block LLaMA (d 64, 4 heads, 2 KV heads, tied embeddings)"
        else:
            from fw_jax.models import load_model, save_hf_folder

            save_hf_folder(load_model(args.model, dtype="float32"), work / "model")
            source = (f"`{pathlib.Path(args.model).name}` (`load_model(..., dtype='float32')`; the GGUF that "
                      "`smollm2-135m` names), written by `save_hf_folder`")
        data = _tokens(args, work)
        check = _logits_check(work, args.seqlen)
        print(f"logits: max |Tunix - fw_jax| {check['max_abs']:.3g} (RoPE as shipped: "
              f"{check['max_abs_shipped_rope']:.3g})", file=sys.stderr, flush=True)
        original = _folder_weights(work / "model")
        rows = []
        for method in methods:
            runs = {}
            for job in ("tunix", "engine"):
                cmd = [sys.executable, __file__, "--child", job, method, str(work), "--max-iter", str(args.max_iter),
                       "--seqlen", str(args.seqlen)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{job} {method} failed:\n{done.stderr[-4000:]}")
                runs[job] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{method} {job}: {runs[job]['seconds']:.1f} s, ppl {runs[job]['ppl']:.3f}", file=sys.stderr,
                      flush=True)
            rows.append((method, runs, _compare(work, method, original)))
    _write(args, source, data, check, rows)
    return 0


def _write(args, source: str, data: str, check: dict, rows: list) -> None:
    command = "python benchmarks/bench_tunix.py" + (" --tiny" if args.tiny else f" --model {pathlib.Path(args.model).name}") + (
        f" --nsamples {args.nsamples} --seqlen {args.seqlen} --eval-windows {args.eval_windows}"
        f" --max-iter {args.max_iter} --methods {args.methods}")
    import jax
    import tunix  # noqa: F401
    from importlib.metadata import version

    lines = [
        "# fw_jax.prune on Tunix's Llama 3 against the fw-jax engine",
        "",
        f"`{command}` on {platform.machine()}, {platform.processor() or 'CPU'}, {os.cpu_count()} CPU cores, "
        f"JAX {jax.__version__} ({jax.default_backend()}), google-tunix {version('google-tunix')}, "
        f"{datetime.date.today().isoformat()}; written by `benchmarks/bench_tunix.py` (its docstring says how).",
        "",
        f"Weights: {source}, loaded into Tunix's `Llama3` and into fw_jax's LLaMA. Logits on "
        f"{check['windows']} windows of {args.seqlen} tokens: max |Tunix − fw_jax| = {check['max_abs']:.2g} "
        f"(largest |logit| {check['scale']:.3g}), with Tunix's RoPE given the config's `rope_theta`; as Tunix "
        f"{version('google-tunix')} ships it (`apply_rope` always at θ = 1,000,000) the difference is "
        f"{check['max_abs_shipped_rope']:.3g}.",
        "",
        f"Calibration: {args.nsamples} windows × {args.seqlen} tokens (kept small for a 2-core CPU), the same "
        f"tokens for both; {data}; perplexity on the first {args.eval_windows} windows of {args.seqlen} tokens. "
        f"Sparsity {SPARSITY:.0%} per output row; sparsefw with `options=SolverOptions(max_iter={args.max_iter})`. "
        "Each pruning in its own process, one after another in this run; time is wall seconds of the pruning call, "
        "compilation included (loading excluded); peak RSS is the process's, loading included.",
        "",
        "| method | fw_jax.prune (Tunix) s | fw-jax engine (fw_jax model) s | ratio | peak RSS GB (Tunix / engine) "
        "| mask entries differing | identical | first block with a difference: entries, rows that are float ties "
        "| later blocks: rows that are float ties | ppl Tunix (numpy) "
        "| ppl fw_jax (evaluator) |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| dense | | | | | | | | | {check['dense_tunix']:.4f} | {check['dense_fw_jax']:.4f} |",
    ]
    notes = []
    for method, runs, cmp in rows:
        t, e = runs["tunix"], runs["engine"]
        f, later = cmp["first"], cmp["later"]
        ties = (f"block {cmp['first_block']}: {f['entries']}, {f['ties']} / {f['rows']}" if f["rows"] else "none")
        later_ties = f"{later['ties']} / {later['rows']}" if later["rows"] else "—"
        lines.append(
            f"| {method} | {t['seconds']:.1f} | {e['seconds']:.1f} | {t['seconds'] / e['seconds']:.2f} | "
            f"{t['peak_rss_gb']:.2f} / {e['peak_rss_gb']:.2f} | {cmp['differing']:,} of {cmp['entries']:,} | "
            f"{cmp['identical']:.6%} | {ties} | {later_ties} | {t['ppl']:.4f} | {e['ppl']:.4f} |")
        if cmp["layers_differing"]:
            shown = ", ".join(cmp["layers_differing"][:12]) + (" …" if len(cmp["layers_differing"]) > 12 else "")
            notes.append(f"- {method}: blocks 0–{cmp['first_block'] - 1} identical" if cmp["first_block"] else
                         f"- {method}: differences from block 0")
            notes[-1] += (f"; in block {cmp['first_block']} (inputs equal up to float rounding: the two runs' Gram "
                          f"diagonals differ by at most {f['noise']:.1g} relative) {', '.join(f['layers'])}, largest "
                          f"relative score gap of a differing row {f.get('gap', 0):.2g}; after it "
                          f"{len(cmp['layers_differing']) - len(f['layers'])} more layers differ, calibrated on "
                          f"inputs that already differ (all layers with differences: {shown}).")
        else:
            notes.append(f"- {method}: every layer's mask is identical.")
        common = sorted(set(t["errors"]) & set(e["errors"]))
        if common:
            rel = max(abs(t["errors"][k] - e["errors"][k]) / max(abs(e["errors"][k]), 1e-30) for k in common)
            notes.append(f"  Largest relative difference of a layer's reported error between the runs: {rel:.2g} "
                         f"({len(common)} layers).")
    lines += ["", "Per method:", ""] + notes + [
        "",
        "A differing row counts as a float tie when the entries one run kept and the other dropped score within "
        "twice the largest relative difference of the two runs' Gram diagonals for that layer (plus 8 float32 "
        "epsilons) of each other, scores `|W_ij| √G_jj` from the engine's Gram matrix. Calibration is sequential: "
        "after the first block whose masks differ, the next blocks see different inputs, so their Gram diagonals "
        "differ by more than rounding and the test there only says the swaps are within that difference. For "
        "sparsefw the score test is only indicative: its masks come from the Frank-Wolfe solve and 1-swaps, not "
        "from a ranking, and its iterates follow the Gram matrix's rounding.",
        "",
    ]
    pathlib.Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

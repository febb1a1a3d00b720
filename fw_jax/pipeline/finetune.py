"""Fine-tune a pruned model with optax, masks kept exactly: ``fw-jax finetune PRUNED --data TEXT``.

What is trained: the weights of every decoder block's linear layers (the ones pruning chose
masks for), with their pruned entries held at exactly 0 (their gradients and updates are
masked); embeddings, norms and the head stay as they are. The loss on random windows of the text
is next-token cross-entropy or, with a ``teacher`` (the dense model), distillation: the
KL divergence from the teacher's next-token distribution (temperature ``τ``), mixed with the
cross-entropy by ``distill``. AdamW with a linear warm-up and a cosine decay, jitted over the
whole model.

Windows are split into training and held-out ones; the held-out loss is measured before the first
step and every ``eval_every`` steps, and the output keeps the weights of the best held-out loss
(the input's own when no step beats it; the report says so). A non-finite training or held-out
loss stops the run with the best weights so far.

Resumable: every ``save_every`` steps the trained weights, the optimizer's state and the record
so far are saved (atomically) in ``OUT.partial``; the same command resumes there, with the same
batches (their order is drawn from ``seed`` up front), so a resumed run ends with the weights an
uninterrupted one ends with. What may be written or replaced is decided in ``output.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fw_jax import _progress, models
from fw_jax._files import atomic_write, replace_folder
from fw_jax.pipeline.identity import digest
from fw_jax.pipeline.data import calibration_tokens, load_documents, needs_bos_per_window
from fw_jax.pipeline._training import (
    check_fields, linear_weights_filter, masked_update, nonzero_masks, train_masked,
)
from fw_jax.pipeline.output import (
    FINISHED, MARKER_NAME, PARTIAL, check_output, clean_stale_temporaries, lock_output, new_temporary, read_marker,
    remove_own_folder, write_marker,
)

__all__ = ["FinetuneSettings", "FinetuneInterrupted", "finetune", "REPORT_NAME", "check_same_tokenizer",
           "tokenizer_difference"]

REPORT_NAME = "finetune_report.json"
STATE_NAME = "finetune_state.npz"


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How ``fw-jax finetune`` trains. The defaults are cheap on a CPU (SmolLM2-135M: about 30 s a
    step on 2 shared cores with a teacher) and were tried once, not tuned (results/finetune.md).

    Attributes:
      steps: optimizer steps.
      learning_rate: AdamW's peak learning rate (linear warm-up over ``warmup`` steps, then cosine to 0).
      warmup: warm-up steps.
      weight_decay: AdamW's decoupled weight decay.
      batch_size: windows per step.
      seqlen: tokens per window.
      nsamples: training windows drawn from the text (batches cycle through them).
      heldout: further windows, never trained on, for the held-out loss.
      eval_every: steps between held-out evaluations (and chances to keep the weights).
      save_every: steps between checkpoints in ``OUT.partial``.
      distill: with a teacher, the weight of the distillation term (1: distillation only, 0:
        cross-entropy only).
      temperature: the distillation temperature ``τ`` (the KL term is scaled by ``τ²``).
      seed: of the windows and of the batch order.
      remat: recompute each block's activations in the backward pass instead of keeping them
        (``jax.checkpoint`` per block): the backward pass then holds one block's activations
        besides the blocks' inputs, for about one more forward pass of compute.
      loss_chunk: positions whose logits are computed at a time (a ``lax.scan`` over chunks
        of the sequence, each recomputed in the backward pass), so the ``(batch, seqlen,
        vocab)`` logits, and the teacher's, never exist whole; 0: all positions at once.
    """

    steps: int = 50
    learning_rate: float = 1e-4
    warmup: int = 5
    weight_decay: float = 0.0
    batch_size: int = 4
    seqlen: int = 256
    nsamples: int = 128
    heldout: int = 8
    eval_every: int = 10
    save_every: int = 10
    distill: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    remat: bool = True
    loss_chunk: int = 64

    def __post_init__(self):
        check_fields("finetune", self, {"steps": 1, "warmup": 0, "batch_size": 1, "seqlen": 2, "nsamples": 1,
                                        "heldout": 1, "eval_every": 1, "save_every": 1, "seed": 0,
                                        "loss_chunk": 0},
                     ("learning_rate", "weight_decay"))
        if not (isinstance(self.distill, (int, float)) and 0 <= self.distill <= 1):
            raise ValueError(f"finetune distill must be in [0, 1] (the distillation term's weight), got {self.distill!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"finetune temperature must be a positive number, got {self.temperature!r}")
        if not isinstance(self.remat, bool):
            raise ValueError(f"finetune remat must be True or False, got {self.remat!r}")


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`finetune`: ``step`` steps are saved in ``work_dir`` (the last checkpoint)."""

    def __init__(self, step: int, steps: int, work_dir: str):
        super().__init__(f"stopped at step {step} of {steps}")
        self.step, self.steps, self.work_dir = step, steps, work_dir


def _trained(model) -> tuple[str, ...]:
    """Paths (``model.layers.3.mlp.up_proj.weight`` style, as nnx names them) of the weights trained."""
    names = []
    for b in range(models.num_blocks(model)):
        for _, group in model.blocks[b].LINEAR_GROUPS:
            names.extend(f"{model.block_path}.{b}.{member}.weight" for member in group)
    return tuple(names)


def _log_softmax(logits, temperature=1.0):
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _final_hidden(model, tokens, remat: bool):
    """The last block's outputs (B, T, d) for tokens (B, T); with ``remat``, each block under
    ``jax.checkpoint`` (its activations recomputed in the backward pass, only its input kept)."""
    h = model.embed(tokens)
    context = model.block_context(tokens.shape[1])
    for block in model.blocks:
        block_graphdef, block_state = nnx.split(block)

        def run(state, h, block_graphdef=block_graphdef):
            return nnx.merge(block_graphdef, state).forward(h, context)[0]

        h = (jax.checkpoint(run) if remat else run)(block_state, h)
    return h


def _token_losses(model, teacher, hidden, teacher_hidden, targets, tau: float, chunk: int):
    """Summed next-token cross-entropy and summed (unscaled) KL from the teacher over all
    positions of ``hidden`` (B, n, d), computing ``chunk`` positions' logits at a time."""

    def sums(h, ht, y, valid):
        logits = model.head(h)
        log_p = _log_softmax(logits)
        ce = -jnp.sum(jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0] * valid)
        if teacher is None:
            return ce, jnp.zeros(())
        log_t = _log_softmax(jax.lax.stop_gradient(teacher.head(ht)), tau)
        log_s = log_p if tau == 1.0 else _log_softmax(logits, tau)
        return ce, jnp.sum(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * valid)

    batch, n = targets.shape
    if chunk <= 0 or chunk >= n:
        return sums(hidden, teacher_hidden, targets, jnp.ones(targets.shape, jnp.float32))
    pieces = -(-n // chunk)
    pad = pieces * chunk - n

    def split(x):  # (B, n, ...) -> (pieces, B, chunk, ...), padded with zeros
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, pieces, chunk, *x.shape[2:]), 1, 0)

    valid = split(jnp.ones(targets.shape, jnp.float32))
    ht = None if teacher_hidden is None else split(teacher_hidden)  # None: an empty pytree, no scan input

    @jax.checkpoint
    def body(total, xs):
        ce, kl = sums(*xs)
        return (total[0] + ce, total[1] + kl), None

    (ce, kl), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (split(hidden), ht, split(targets), valid))
    return ce, kl


@functools.lru_cache(maxsize=4)
def _compiled(graphdef, teacher_graphdef, settings: FinetuneSettings):
    """The jitted loss and step of a model structure (and its teacher's)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, settings.warmup,
                                                  max(settings.steps, settings.warmup + 1))
    optimizer = optax.adamw(schedule, weight_decay=settings.weight_decay)
    tau = float(settings.temperature)

    def losses(weights, rest, teacher_state, tokens):
        """Mean next-token cross-entropy and, with a teacher, the τ²-scaled KL from it."""
        model = nnx.merge(graphdef, weights, rest)
        hidden = _final_hidden(model, tokens, settings.remat)[:, :-1]
        teacher = teacher_hidden = None
        if teacher_graphdef is not None:
            teacher = nnx.merge(teacher_graphdef, teacher_state)
            teacher_hidden = jax.lax.stop_gradient(_final_hidden(teacher, tokens, False)[:, :-1])
        targets = tokens[:, 1:]
        ce, kl = _token_losses(model, teacher, hidden, teacher_hidden, targets, tau, settings.loss_chunk)
        return ce / targets.size, kl / targets.size * tau**2

    def objective(weights, rest, teacher_state, tokens):
        ce, kl = losses(weights, rest, teacher_state, tokens)
        if teacher_graphdef is None:
            return ce, (ce, kl)
        return (1 - settings.distill) * ce + settings.distill * kl, (ce, kl)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # the step's weights and state replace its inputs
    def step(weights, opt_state, masks, rest, teacher_state, tokens):
        (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(weights, rest, teacher_state, tokens)
        weights, opt_state = masked_update(optimizer, weights, opt_state, grads, masks)
        return weights, opt_state, loss

    evaluate = jax.jit(objective)
    return optimizer, step, evaluate


def _batches(settings: FinetuneSettings) -> np.ndarray:
    """``(steps, batch_size)`` indices of the training windows, drawn once from the seed."""
    rng = np.random.default_rng([settings.seed, 1])
    need = settings.steps * settings.batch_size
    order = np.concatenate([rng.permutation(settings.nsamples) for _ in range(-(-need // settings.nsamples))])
    return order[:need].reshape(settings.steps, settings.batch_size)


def finetune(
    model: str,
    out_dir: str,
    data,
    settings: FinetuneSettings = FinetuneSettings(),
    *,
    teacher: Optional[str] = None,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool | _progress.Progress = True,
    after_step=None,
) -> dict:
    """Fine-tune the pruned ``model`` (a folder, GGUF file or ``"smollm2-135m"``) on ``data``
    (anything :func:`~fw_jax.pipeline.load_documents` reads) into the Hugging Face folder
    ``out_dir``, with ``finetune_report.json``. See the module docstring for what is trained,
    kept and resumed. ``teacher``: the dense model to distil from (same tokenizer). ``dtype``: of
    the written weights, as for ``prune_to_folder`` (training is in float32).
    ``after_step(step)`` is called after every step (tests interrupt with it).

    Returns the report: settings, held-out losses before and after, the step whose weights are
    kept, the training losses, seconds.

    Raises:
      FileExistsError: ``out_dir`` holds a finished model and ``overwrite`` is false.
      OutputError, DataError (``ValueError``): what the message says; nothing was written.
      FinetuneInterrupted: Ctrl-C; the last checkpoint is in ``OUT.partial``.
    """
    with _progress.use(progress) as report_to:
        return _finetune(model, out_dir, data, settings, teacher, dtype, overwrite, report_to, after_step)


def _finetune(model_path, out_dir, data, settings, teacher_path, dtype, overwrite, progress, after_step) -> dict:
    """Check and lock the output, load the data and models, resume or start, train, publish."""
    if not isinstance(settings, FinetuneSettings):
        raise ValueError(f"settings must be a fw_jax.pipeline.FinetuneSettings, got {settings!r}")
    plan, documents, request = _check_request(model_path, out_dir, data, settings, teacher_path, dtype, overwrite)
    with lock_output(plan):  # one run at a time per OUT (a hidden .OUT.lock beside it)
        loaded, train, held = _load_data(model_path, documents, data, settings, dtype, request)
        fingerprint = digest(request)
        names = _trained(loaded.model)
        graphdef, weights, rest = nnx.split(loaded.model, linear_weights_filter(names), ...)
        if len(jax.tree.leaves(weights)) != len(names):  # every linear weight found, or the model's layout changed
            raise AssertionError(f"found {len(jax.tree.leaves(weights))} of the {len(names)} linear weights to train")
        masks = nonzero_masks(weights)
        teacher_graphdef, teacher_state = _teacher(teacher_path, model_path, loaded)
        optimizer, step_fn, evaluate = _compiled(graphdef, teacher_graphdef, settings)

        def held_loss(w):
            chunks = [held[i:i + settings.batch_size] for i in range(0, held.shape[0], settings.batch_size)]
            losses = [float(evaluate(w, rest, teacher_state, chunk)[0]) * chunk.shape[0] for chunk in chunks]
            return sum(losses) / held.shape[0]

        best = weights  # the model's own arrays; the steps train (and donate) copies of them
        weights = jax.tree.map(jnp.copy, weights)
        arrays, state = _resume_or_start(plan, overwrite, fingerprint, request, progress, held_loss,
                                         {"weights": weights, "opt_state": optimizer.init(weights), "best": best})
        progress.say(f"fine-tuning {model_path}: {len(names)} linear weights (masks kept), {settings.steps} steps of "
                     f"{settings.batch_size}×{settings.seqlen} tokens of {data}"
                     + (f", distilling from {teacher_path}" if teacher_path else "")
                     + f"; held-out loss {state['heldout_before']:.4f}")
        step = lambda w, s, rows: step_fn(w, s, masks, rest, teacher_state, train[rows])  # noqa: E731
        trained = _train(step, arrays, state, settings, held_loss, plan.work_dir, fingerprint, progress, after_step)
        nnx.update(loaded.model, trained.best)
        report = {"model": model_path, "teacher": teacher_path, "data": request["data"],
                  "settings": dataclasses.asdict(settings), "trained": len(names),
                  "heldout_before": state["heldout_before"], "heldout_after": state["best"],
                  "kept_step": state["best_step"], "stopped": trained.stopped, "heldout": state["heldout"],
                  "losses": state["losses"], "seconds": state["seconds"]}
        _publish(loaded, plan, report, request, model_path)
    return report


def _check_request(model_path, out_dir, data, settings, teacher_path, dtype, overwrite):
    """The output checked (never over the model or the teacher), the data read, stale
    temporaries removed: ``(plan, documents, request)``, before any model is loaded."""
    models.output_dtype("float32", dtype)  # a bad name is refused before anything is read
    plan = check_output(out_dir, model_path)
    if teacher_path is not None:
        check_output(out_dir, teacher_path)  # never over the teacher either
    documents = load_documents(data)
    request = {"command": "finetune", "model": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
               "teacher": None if teacher_path is None else (os.path.abspath(teacher_path)
                                                             if os.path.exists(teacher_path) else teacher_path),
               "data": data if isinstance(data, str) else list(data), "dtype": dtype,
               "settings": dataclasses.asdict(settings)}
    for folder in (plan.out_dir, plan.work_dir):
        clean_stale_temporaries(folder)
    plan.check_replace(overwrite)
    return plan, documents, request


def _load_data(model_path, documents, data, settings, dtype, request):
    """The model and its training and held-out windows (their digest goes into ``request``)."""
    loaded = models.load_model(model_path, dtype=dtype)
    if loaded.tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer; fine-tuning on text needs one")
    bos_id = getattr(loaded.tokenizer, "bos_token_id", None) if needs_bos_per_window(loaded) else None
    tokens = calibration_tokens(loaded.tokenizer, documents, settings.nsamples + settings.heldout, settings.seqlen,
                                settings.seed, bos_id=bos_id, source=str(data))
    request["tokens"] = hashlib.sha256(np.ascontiguousarray(tokens, np.int64).tobytes()).hexdigest()
    return loaded, jnp.asarray(tokens[:settings.nsamples]), jnp.asarray(tokens[settings.nsamples:])


def _teacher(teacher_path, model_path, loaded):
    """The teacher's ``(graphdef, state)`` for distillation, checked to share the model's
    tokenizer; ``(None, None)`` without one."""
    if teacher_path is None:
        return None, None
    dense = models.load_model(teacher_path, dtype="float32")
    if dense.config is not None and loaded.config is not None and \
            getattr(dense.config, "vocab_size", None) != getattr(loaded.config, "vocab_size", None):
        raise ValueError(f"--teacher {teacher_path} has vocabulary size {getattr(dense.config, 'vocab_size', '?')}, "
                         f"the model {getattr(loaded.config, 'vocab_size', '?')}: distillation needs the same tokenizer")
    check_same_tokenizer(model_path, loaded.tokenizer, teacher_path, dense.tokenizer)
    return nnx.split(dense.model)


def _resume_or_start(plan, overwrite, fingerprint, request, progress, held_loss, arrays):
    """``(arrays, state)``: those saved in ``OUT.partial`` by an interrupted run of this very
    request, or the fresh ones given with a new state (``OUT.partial`` made and marked)."""
    work_dir = plan.work_dir
    state = {"step": 0, "best_step": 0, "best": None, "heldout_before": None, "heldout": [], "losses": [],
             "seconds": 0.0}
    resumed = _read_state(work_dir, fingerprint, arrays)
    if resumed is not None:
        arrays, state = resumed
        progress.say(f"resuming at step {state['step']} of {request['settings']['steps']} from {work_dir}")
        return arrays, state
    if plan.partial is not None and not overwrite:
        raise ValueError(f"{work_dir} holds the checkpoints of another fine-tuning or pruning run; pass "
                         "--overwrite to discard them and start over")
    if plan.partial is not None:  # fw_jax's own (another run's, discarded as asked)
        remove_own_folder(work_dir)
    os.makedirs(work_dir, exist_ok=True)  # an empty folder of the user's is used, not deleted
    write_marker(work_dir, PARTIAL, describe="fine-tuning", request=request)
    state["heldout_before"] = state["best"] = held_loss(arrays["weights"])
    return arrays, state


def _train(step, arrays, state, settings, held_loss, work_dir, fingerprint, progress, after_step):
    """The masked training loop (``_training.train_masked``) with this command's bookkeeping
    after every step: the state, the progress line, a checkpoint every ``save_every`` steps."""
    start = time.perf_counter()

    def on_step(event):
        nonlocal start  # when the seconds not yet counted in ``state`` began
        state["losses"].append(event.loss)
        state["step"] = event.step
        if event.stopping == "nonfinite":
            what, value = ("loss", event.loss) if event.held is None else ("held-out loss", event.held)
            progress.say(f"step {event.step}: the {what} is not finite ({value}); stopping with the best weights so far")
            return
        if event.held is not None:
            state["heldout"].append([event.step, event.held])
            state["best"], state["best_step"] = event.state.best_loss, event.state.best_step
            progress.say(f"step {event.step}/{settings.steps}: train loss {event.loss:.4f}, held-out {event.held:.4f} "
                         f"(best {state['best']:.4f} at step {state['best_step']})", _progress.VERBOSE)
        if event.step % settings.save_every == 0 and event.step < settings.steps:
            state["seconds"] += time.perf_counter() - start
            start = time.perf_counter()
            _write_state(work_dir, fingerprint, {"weights": event.state.weights, "opt_state": event.state.opt_state,
                                                 "best": event.state.best}, state)
        bar.advance(note=f"loss {event.loss:.3f}")
        if after_step is not None:
            after_step(event.step)

    batches = _batches(settings)
    try:
        with progress.steps(settings.steps, "fine-tuning", unit="step") as bar:
            bar.advance(state["step"])
            trained = train_masked(
                step, arrays["weights"], arrays["opt_state"], lambda t: (batches[t],), steps=settings.steps,
                eval_every=settings.eval_every, held_loss=held_loss, best=arrays["best"], best_loss=state["best"],
                best_step=state["best_step"], start=state["step"], on_step=on_step)
    except KeyboardInterrupt:
        saved = _read_state(work_dir, fingerprint, None, header_only=True)
        raise FinetuneInterrupted(0 if saved is None else saved["step"], settings.steps, work_dir) from None
    state["seconds"] += time.perf_counter() - start
    return trained


def _publish(loaded, plan, report, request, model_path) -> None:
    """Write the fine-tuned model and its report aside, rename into place, remove ``OUT.partial``."""
    tmp = new_temporary(plan.out_dir)
    try:
        models.WRITERS["hf"](loaded, tmp)
        atomic_write(os.path.join(tmp, REPORT_NAME), json.dumps(report, indent=1))
        files = sorted(name for name in os.listdir(tmp) if name != MARKER_NAME)
        write_marker(tmp, FINISHED, describe=f"fine-tuned {model_path}", request=request, files=files)
        replace_folder(tmp, plan.out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_own_folder(plan.work_dir)


def check_same_tokenizer(model_path: str, tokenizer, teacher_path: str, teacher_tokenizer) -> None:
    """Refuse a teacher whose tokenizer is not the model's: distillation compares the two models'
    next-token distributions id by id, so every id must be the same token in both, and (for BPE
    tokenizers) the merges must be the same, so that the teacher was trained on the same
    segmentation of text. Raises ``ValueError`` naming both paths and the first difference
    (``token id 17 is 'ab' in MODEL but 'cd' in TEACHER``)."""
    if teacher_tokenizer is None:
        raise ValueError(f"--teacher {teacher_path} has no tokenizer, so fw_jax cannot check that its token ids mean "
                         f"what those of {model_path} mean; distillation needs the same tokenizer (copy the model's "
                         "tokenizer files into the teacher's folder if it is the same)")
    difference = tokenizer_difference(tokenizer, model_path, teacher_tokenizer, teacher_path)
    if difference is not None:
        raise ValueError(f"--teacher {teacher_path} does not have the tokenizer of {model_path}: {difference}. "
                         "Distillation compares the two models' predictions token id by token id, so it needs "
                         "the same tokenizer")


def tokenizer_difference(a, name_a: str, b, name_b: str) -> Optional[str]:
    """The first difference between two ``transformers`` tokenizers that changes what a token id
    means, as a phrase naming both (``name_a``, ``name_b``); ``None`` when there is none: every id
    is the same token (added tokens included), the tokenizer models are of the same kind and, for
    BPE, have the same merges in the same order."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    tokens_a, tokens_b = ({i: t for t, i in v.items()} for v in (vocab_a, vocab_b))
    for i in sorted(set(tokens_a) | set(tokens_b)):
        if tokens_a.get(i) != tokens_b.get(i):
            return f"token id {i} is {_token(tokens_a.get(i))} in {name_a} but {_token(tokens_b.get(i))} in {name_b}"
    for token in sorted(set(vocab_a) | set(vocab_b)):  # a token with two ids in one of them
        if vocab_a.get(token) != vocab_b.get(token):
            return f"token {token!r} is id {vocab_a.get(token)} in {name_a} but id {vocab_b.get(token)} in {name_b}"
    model_a, model_b = _backend_model(a), _backend_model(b)
    if model_a.get("type") != model_b.get("type"):
        return f"{name_a} has a {model_a.get('type')} tokenizer but {name_b} a {model_b.get('type')} one"
    merges_a, merges_b = _merges(model_a), _merges(model_b)
    for i in range(max(len(merges_a), len(merges_b))):
        x = merges_a[i] if i < len(merges_a) else None
        y = merges_b[i] if i < len(merges_b) else None
        if x != y:
            return f"merge {i} is {_merge(x)} in {name_a} but {_merge(y)} in {name_b}"
    return None


def _token(token) -> str:
    return "no token" if token is None else repr(token)


def _merge(pair) -> str:
    return "absent" if pair is None else repr(" ".join(pair))


def _backend_model(tokenizer) -> dict:
    """The ``model`` section of a fast tokenizer's ``tokenizer.json`` (``{}`` for a slow one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    return json.loads(backend.to_str()).get("model") or {}


def _merges(model: dict) -> list[tuple[str, ...]]:
    """BPE merges as pairs, whichever of the two forms ``tokenizer.json`` holds them in."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or ()]


def _write_state(work_dir: str, fingerprint: str, arrays: dict, state: dict) -> None:
    """The checkpoint: the arrays (an ``.npz`` of the pytree's leaves) first, then the record that names them."""
    leaves = jax.tree.leaves(arrays)
    atomic_write(os.path.join(work_dir, STATE_NAME), lambda f: np.savez(f, *[np.asarray(leaf) for leaf in leaves]))
    atomic_write(os.path.join(work_dir, "finetune_state.json"), json.dumps({"fingerprint": fingerprint, **state}))


def _read_state(work_dir: str, fingerprint: str, template, header_only: bool = False):
    """The checkpoint of this very run (same fingerprint), or ``None``."""
    try:
        with open(os.path.join(work_dir, "finetune_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if state.pop("fingerprint", None) != fingerprint or read_marker(work_dir) is None:
        return None
    if header_only:
        return state
    with np.load(os.path.join(work_dir, STATE_NAME)) as saved:
        leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    treedef = jax.tree.structure(template)
    if treedef.num_leaves != len(leaves):
        return None
    like = jax.tree.leaves(template)
    return jax.tree.unflatten(treedef, [jnp.asarray(v, t.dtype) for v, t in zip(leaves, like)]), state

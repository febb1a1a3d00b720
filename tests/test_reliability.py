"""What fw_jax promises when things go wrong: the catalogue of faults, each a case of one line.

Every case runs the ``fw-jax`` command as a user would and checks three things: the exit code,
the message, and that nothing the user had was lost (their files are still there, unchanged).
The faults: output folders fw_jax must not touch, options and budgets refused before anything
is written, bad checkpoints and data, kills and Ctrl-C at chosen moments, and solver inputs for
which no bound can be proved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Callable

import jax
import numpy as np
import pytest
import safetensors.numpy
from safetensors.numpy import load_file

import fw_jax
from fw_jax.cli import INTERRUPTED, USAGE_ERROR
from fw_jax.cli import main as cli_main
from fw_jax.pipeline.output import MARKER_NAME
from models_fixtures import folder_tensors, random_torch_model, tiny_config, write_tiny_gguf
from solver_problems import best_row_error, correlated_problem
from test_pipeline_data import char_tokenizer
from test_pipeline_prune import TEXT
from tolerances import assert_le

FAST = ["--nsamples", "2", "--seqlen", "16", "--max-iter", "5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny LLaMA checkpoint (folder and GGUF), calibration text, and one finished output."""
    root = tmp_path_factory.mktemp("world")
    model = root / "model"
    config = tiny_config("llama", intermediate_size=64, max_position_embeddings=128)
    torch_model = random_torch_model(config, seed=3)
    torch_model.save_pretrained(model, safe_serialization=True)
    char_tokenizer().save_pretrained(model)
    (root / "calib.txt").write_text(TEXT, encoding="utf-8")
    finished = root / "finished"
    assert cli_main(["prune", str(model), "--out", str(finished), "--calib", str(root / "calib.txt"), *FAST]) == 0
    return {"root": root, "model": model, "calib": root / "calib.txt", "finished": finished,
            "torch_model": torch_model, "config": config}


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes: what 'nothing was lost' compares."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def user_folder(path, files=("notes.txt", "data/results.csv")):
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(f"the user's own {name}\n")


@dataclasses.dataclass
class Case:
    """One fault: ``setup(tmp, world)`` prepares it and returns the command's arguments (after
    ``prune``/``eval``); the command must exit with ``code`` and print ``message`` (a regex) on
    stderr; every file under each of ``kept`` (relative to tmp, or ``model``) is unchanged."""

    name: str
    setup: Callable
    code: int = USAGE_ERROR
    message: str = ""
    kept: tuple = ("model",)
    absent: tuple = ("out", "out.partial")  #: must not exist afterwards (nothing written)


def _prune(tmp, world, *extra, out="out"):
    return ["prune", str(world["model"]), "--out", str(tmp / out), "--calib", str(world["calib"]), *FAST, *extra]


def _foreign_out(tmp, world, *extra):
    user_folder(tmp / "out")
    return _prune(tmp, world, *extra)


def _own_out_with_user_file(tmp, world):
    shutil.copytree(world["finished"], tmp / "out")
    (tmp / "out" / "my_eval.txt").write_text("mine\n")
    return _prune(tmp, world, "--overwrite", "--sparsity", "0.6")


def _out_is_a_file(tmp, world):
    (tmp / "out").write_text("a file\n")
    return _prune(tmp, world)


def _bad_config(tmp, world):
    shutil.copytree(world["model"], tmp / "bad")
    config = json.loads((tmp / "bad" / "config.json").read_text())
    config["num_attention_heads"] = 5  # does not divide hidden_size 48
    (tmp / "bad" / "config.json").write_text(json.dumps(config))
    return ["prune", str(tmp / "bad"), "--out", str(tmp / "out"), "--calib", str(world["calib"]), *FAST]


def _nan_tensor(tmp, world):
    shutil.copytree(world["model"], tmp / "bad")
    path = tmp / "bad" / "model.safetensors"
    tensors = dict(safetensors.numpy.load_file(path))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return ["prune", str(tmp / "bad"), "--out", str(tmp / "out"), "--calib", str(world["calib"]), *FAST]


def _nan_gguf(tmp, world):
    torch_model = random_torch_model(world["config"], seed=4)
    import torch

    with torch.no_grad():
        torch_model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    write_tiny_gguf(torch_model, world["config"], tmp / "bad.gguf", quantize_mlp=False)
    return ["prune", str(tmp / "bad.gguf"), "--out", str(tmp / "out"), "--calib", str(world["calib"]), *FAST]


def _short_calibration(tmp, world):
    (tmp / "short.txt").write_text(TEXT[:88])
    return ["prune", str(world["model"]), "--out", str(tmp / "out"), "--calib", str(tmp / "short.txt"),
            "--nsamples", "4", "--seqlen", "64", "--max-iter", "2"]


CASES = [
    # Output folders fw_jax did not write, or must not replace.
    Case("out is a user's folder", lambda t, w: _foreign_out(t, w),
         message="not empty and was not written by fw_jax", kept=("model", "out"), absent=("out.partial",)),
    Case("out is a user's folder, --overwrite", lambda t, w: _foreign_out(t, w, "--overwrite"),
         message="never replaces a folder it did not write, even with --overwrite", kept=("model", "out"),
         absent=("out.partial",)),
    Case("out is the input model", lambda t, w: ["prune", str(w["model"]), "--out", str(w["model"]), "--overwrite",
                                                 "--calib", str(w["calib"]), *FAST],
         message="is the input model", absent=()),
    Case("out holds the input model", lambda t, w: ["prune", str(w["model"]), "--out", str(w["root"]), "--overwrite",
                                                    "--calib", str(w["calib"]), *FAST],
         message="holds the input model", absent=()),
    Case("out is a file", _out_is_a_file, message="is a file, not a folder", kept=("model", "out"), absent=()),
    Case("--overwrite of fw_jax's folder with a user's file in it", _own_out_with_user_file,
         message=r"also holds files it did not write \(my_eval.txt\)", kept=("model", "out"), absent=("out.partial",)),
    Case("finished output, no --overwrite", lambda t, w: [*_prune(t, w, "--sparsity", "0.6")[:3], str(w["finished"]),
                                                          *_prune(t, w, "--sparsity", "0.6")[4:]],
         message="already holds a finished pruned model.*--overwrite", absent=()),
    # Options, budgets and lengths: refused before anything is written.
    Case("--alpha 1.5", lambda t, w: _prune(t, w, "--alpha", "1.5"), message=r"alpha must be in \[0, 1\]"),
    Case("--max-iter -3", lambda t, w: _prune(t, w, "--max-iter", "-3"), message="max_iter must be an int ≥ 0"),
    Case("--tol nan", lambda t, w: _prune(t, w, "--tol", "nan"), message="tol must be a finite number"),
    Case("--tol -1", lambda t, w: _prune(t, w, "--tol", "-1"), message="tol must be a finite number"),
    Case("--pattern 2:3 on a layer of 64 inputs", lambda t, w: _prune(t, w, "--pattern", "2:3"),
         message=r"layer model.layers.0.mlp.down_proj \(48×64\): NM\(2, 3\): m = 3 does not divide d_in = 64"),
    Case("--alpha for the published recipe", lambda t, w: _prune(t, w, "--method", "sparsefw-published", "--alpha", "0.5"),
         message="sparsefw-published does not use alpha.*the published recipe"),
    Case("--max-iter for wanda", lambda t, w: _prune(t, w, "--method", "wanda", "--max-iter", "7"),
         message="wanda does not use options"),
    Case("--pattern 2to4", lambda t, w: _prune(t, w, "--pattern", "2to4"), message="--pattern: an n:m pattern is two integers"),
    Case("--seqlen beyond the positions", lambda t, w: _prune(t, w, "--seqlen", "100000"),
         message=r"seqlen=100000 is longer than the model supports \(128 positions\)"),
    Case("--nsamples 0", lambda t, w: _prune(t, w, "--nsamples", "0"), message="nsamples must be an integer"),
    Case("eval --seqlen beyond the positions", lambda t, w: ["eval", str(w["model"]), "--data", str(w["calib"]),
                                                             "--seqlen", "100000"],
         message="longer than model", absent=()),
    # Bad checkpoints and data name the file (and the tensor, the layer).
    Case("config with heads not dividing the width", _bad_config,
         message=r"bad/config.json: invalid llama config: .*hidden size \(48\).*attention heads \(5\)"),
    Case("NaN in a safetensors tensor", _nan_tensor,
         message=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' .* 1 non-finite"),
    Case("NaN in a GGUF tensor", _nan_gguf, message=r"bad.gguf: tensor 'model.layers.0.self_attn.o_proj.weight' \(48, 48\) holds 1 non-finite"),
    Case("missing calibration file", lambda t, w: ["prune", str(w["model"]), "--out", str(t / "out"),
                                                   "--calib", str(t / "missing.txt"), *FAST],
         message="missing.txt"),
    Case("calibration shorter than a window", lambda t, w: (t.joinpath("tiny.txt").write_text("few words"), [
        "prune", str(w["model"]), "--out", str(t / "out"), "--calib", str(t / "tiny.txt"), *FAST])[1],
         message=r"tiny.txt: no document is longer than a window"),
    # Accepted, but said: overlapping calibration windows.
    Case("88 tokens for 4×64 windows", _short_calibration, code=0,
         message=r"warning: .*short.txt: only 88 tokens of calibration text for 4 windows of 64 tokens \(256",
         absent=("out.partial",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fault_catalogue(case, world, tmp_path, capsys):
    argv = case.setup(tmp_path, world)
    before = {k: snapshot(world["model"] if k == "model" else tmp_path / k) if (
        k == "model" or (tmp_path / k).is_dir()) else (tmp_path / k).read_bytes() for k in case.kept}
    finished_before = snapshot(world["finished"])
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    import re

    assert re.search(case.message, err, re.S), err
    for k, was in before.items():
        now = snapshot(world["model"] if k == "model" else tmp_path / k) if (
            k == "model" or (tmp_path / k).is_dir()) else (tmp_path / k).read_bytes()
        assert now == was, f"{k} changed"
    assert snapshot(world["finished"]) == finished_before
    for k in case.absent:
        assert not (tmp_path / k).exists(), f"{k} was written"
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == []


# --- Overwrite replaces only what fw_jax wrote; the same command twice is idempotent. --------------


def test_overwrite_replaces_fw_jax_output_and_same_command_is_a_no_op(world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _prune(tmp_path, world)
    out.mkdir()  # an empty folder the user made for it is fine
    assert cli_main(argv) == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["kind"] == "pruned-model" and set(marker["files"]) == set(os.listdir(out)) - {MARKER_NAME}
    first = snapshot(out)
    capsys.readouterr()
    assert cli_main(argv) == 0  # the same command again: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert snapshot(out) == first
    assert cli_main(argv[:] + ["--sparsity", "0.6"]) == USAGE_ERROR  # another run needs --overwrite
    assert snapshot(out) == first
    assert cli_main(argv[:] + ["--sparsity", "0.6", "--overwrite"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["sparsity"] == 0.6
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --- Resume: refuses another run, says what differs, never mixes calibration texts. -------------


def test_failed_option_does_not_block_the_corrected_rerun(world, tmp_path):
    assert cli_main(_prune(tmp_path, world, "--pattern", "2:3")) == USAGE_ERROR
    assert not (tmp_path / "out.partial").exists()
    assert cli_main(_prune(tmp_path, world, "--pattern", "2:4")) == 0


def _interrupt_after_first_block(monkeypatch, exception=KeyboardInterrupt):
    from fw_jax.pipeline import prune

    real = prune._save_block

    def save_then_stop(work_dir, b, *args):
        real(work_dir, b, *args)
        if b == 0:
            raise exception

    monkeypatch.setattr(prune, "_save_block", save_then_stop)


def test_ctrl_c_says_where_it_stopped_and_the_same_command_resumes(world, tmp_path, monkeypatch, capsys):
    argv = _prune(tmp_path, world)
    with monkeypatch.context() as m:
        _interrupt_after_first_block(m)
        assert cli_main(argv) == INTERRUPTED
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C; 1 of 2 blocks are saved in" in err and "same command again to resume" in err
    assert "Traceback" not in err
    assert cli_main(argv) == 0
    assert "resuming after block 0" in capsys.readouterr().err


def test_resume_refuses_changed_calibration_text_and_says_what_differs(world, tmp_path, monkeypatch, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    argv = ["prune", str(world["model"]), "--out", str(tmp_path / "out"), "--calib", str(calib), *FAST]
    with monkeypatch.context() as m:
        _interrupt_after_first_block(m)
        assert cli_main(argv) == INTERRUPTED
    partial = snapshot(tmp_path / "out.partial")
    calib.write_text(TEXT[::-1])  # same file, other text
    capsys.readouterr()
    assert cli_main(argv) == USAGE_ERROR
    err = capsys.readouterr().err
    assert "calibration tokens: different" in err and "--overwrite" in err
    assert snapshot(tmp_path / "out.partial") == partial  # the refused run wrote nothing
    assert cli_main(argv + ["--alpha", "0.5"]) == USAGE_ERROR
    assert "settings.alpha: 0.9 there, 0.5 now" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite"]) == 0  # discards the other run's checkpoints, starts over
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["resumed_blocks"] == 0


# --- SIGKILL at chosen moments of finishing: the rerun finishes, same model, no leftovers. ------

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from fw_jax.pipeline import output, run
    moment = {moment!r}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "while saving":  # the temporary folder is half written
        real_plots = run._write_plots
        run._write_plots = lambda report, folder: die()
    elif moment == "while publishing":  # the old output moved aside, the new not yet in place
        real_rename = os.rename
        calls = []
        def rename(a, b):
            real_rename(a, b)
            calls.append(b)
            if len(calls) == 1:
                die()
        output.os.rename = rename
    elif moment == "while removing the checkpoints":  # .partial moved aside, half deleted
        real_rmtree = output.shutil.rmtree
        def rmtree(path, **kw):
            if ".partial.old-" in path:
                block = os.path.join(path, "x", "block_0000.safetensors")
                os.remove(block)
                die()
            real_rmtree(path, **kw)
        output.shutil.rmtree = rmtree
    elif moment == "ctrl-c after block 0":  # a real SIGINT, as the terminal sends it
        from fw_jax.pipeline import prune
        real_save = prune._save_block
        def save(work_dir, b, *args):
            real_save(work_dir, b, *args)
            if b == 0:
                signal.raise_signal(signal.SIGINT)  # to this very thread, as a terminal would the main one
        prune._save_block = save
    from fw_jax.cli import main
    sys.exit(main({argv!r}))
""")


@pytest.mark.parametrize("moment", ["while saving", "while publishing", "while removing the checkpoints"])
def test_sigkill_while_finishing_then_the_same_command_finishes_cleanly(world, tmp_path, moment, capsys):
    out = tmp_path / "out"
    if moment == "while publishing":  # replacing an earlier output of fw_jax's
        shutil.copytree(world["finished"], out)
        argv = _prune(tmp_path, world, "--sparsity", "0.6", "--overwrite")
    else:
        argv = _prune(tmp_path, world)
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), moment=moment, argv=argv)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no .partial, no hidden temporaries
    reference = tmp_path.parent / f"{tmp_path.name}-reference"
    assert cli_main([*argv[:3], str(reference), *argv[4:]]) == 0
    a, b = folder_tensors(out), folder_tensors(reference)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # passes here, but twice in fresh clones the SIGINT did not interrupt (cause open; see the stop note)
def test_a_real_ctrl_c_prints_no_traceback_and_exits_130(world, tmp_path):
    argv = _prune(tmp_path, world)
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), moment="ctrl-c after block 0", argv=argv)
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == INTERRUPTED, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert "stopped by Ctrl-C; 1 of 2 blocks are saved in" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["out.partial"]


def test_read_only_out_is_refused_before_loading(world, tmp_path, monkeypatch, capsys):
    from fw_jax import models
    from fw_jax.pipeline import output

    monkeypatch.setattr(output.os, "access", lambda path, mode: False)  # tests may run as root
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a))
    assert cli_main(_prune(tmp_path, world)) == USAGE_ERROR
    assert "is not a writable folder" in capsys.readouterr().err and loads == []


# --- The solver: no bound on an indefinite Gram matrix; degenerate inputs get messages. ---------

BUDGETS = [fw_jax.PerRow(5), fw_jax.NM(2, 4), fw_jax.LayerBudget(20)]


def _indefinite(kind, gram, rng):
    if kind == "-G":
        return -gram
    if kind == "G - 2λmax I":
        return gram - 2 * np.linalg.eigvalsh(gram)[-1] * np.eye(len(gram))
    a = rng.normal(size=gram.shape)
    return (a + a.T) / 2


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("kind", ["-G", "G - 2λmax I", "random symmetric"])
def test_indefinite_gram_is_refused_naming_its_smallest_eigenvalue(kind, budget):
    rng = np.random.default_rng(0)
    weight, gram = correlated_problem(rng, 4, 12)
    bad = _indefinite(kind, gram, rng)
    with pytest.raises(ValueError, match="not positive semidefinite: its smallest eigenvalue is at most -") as info:
        fw_jax.solve_layer(weight, bad, budget)
    found = float(str(info.value).split("at most ")[1].split(" ")[0])
    assert found < 0
    assert_le(np.linalg.eigvalsh(bad)[0], found, rtol=1e-6)  # λ_min ≤ found: it is a Rayleigh quotient
    with pytest.raises(ValueError, match="not positive semidefinite"):
        fw_jax.mask_lower_bound(weight, bad, budget, np.asarray(fw_jax.wanda_mask(weight, gram, budget)))
    # Under an outer jit nothing can raise: the status says so, and no bound is claimed.
    sol = jax.jit(lambda w, g: fw_jax.solve_layer(w, g, budget))(weight, bad)
    assert sol.status_name == "indefinite" and float(sol.lower_bound) == -np.inf


def test_gram_psd_up_to_rounding_passes_and_keeps_its_bound():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 16)).astype(np.float32)  # fewer tokens than inputs: singular, as real Grams can be
    x[:8] *= 30
    gram = x @ x.T
    assert np.linalg.eigvalsh(gram.astype(np.float64))[0] < 0  # indefinite by rounding, in float32
    weight = rng.normal(size=(8, 64)).astype(np.float32)
    sol = fw_jax.solve_layer(weight, gram, 32)
    assert sol.status_name in ("converged", "max_iterations") and float(sol.lower_bound) >= 0
    jitted = jax.jit(lambda w, g: fw_jax.solve_layer(w, g, 32))(weight, gram)
    assert jitted.status_name != "indefinite"
    np.testing.assert_array_equal(np.asarray(jitted.mask), np.asarray(sol.mask))
    # And on a small PSD case the bound is below the enumerated optimum.
    w, g = correlated_problem(rng, 2, 10)
    best = sum(best_row_error(w[i], g, 4) for i in range(2))
    assert float(fw_jax.solve_layer(w, g, 4).lower_bound) <= best * (1 + 1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda: fw_jax.solve_layer(np.zeros((0, 8)), np.eye(8), 4), r"shape \(0, 8\); a layer needs at least one row"),
    (lambda: fw_jax.solve_layer([[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 1.0]], 1), None),
    (lambda: fw_jax.solve_layer([[1.0, 2.0], [3.0]], np.eye(2), 1), "2-D array of floats"),
    (lambda: fw_jax.solve_layer(np.ones((2, 4)), np.eye(4), 2, tol=float("nan")), "tol = nan must be a finite"),
    (lambda: fw_jax.solve_layer(np.ones((2, 4)), np.eye(4), 2, tol=-1.0), "tol = -1.0 must be a finite"),
], ids=["0 rows", "python lists", "ragged lists", "tol nan", "tol -1"])
def test_degenerate_solver_inputs(call, message):
    if message is None:  # lists are arrays too
        sol = call()
        assert np.asarray(sol.mask).sum() == 2
    else:
        with pytest.raises(ValueError, match=message):
            call()

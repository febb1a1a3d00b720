"""End to end on tiny random models: every method and budget, resume, transformers round trip, CLI."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from fw_jax import SolverOptions
from fw_jax import models
from fw_jax.cli import main as cli_main
from fw_jax.pipeline import PruneSettings, evaluate_perplexity, identity, prune_model, prune_to_folder
from fw_jax.pipeline import SparseFW
from models_fixtures import folder_tensors, random_torch_model, tiny_config
from tolerances import assert_le
from test_pipeline_data import char_tokenizer

TEXT = (open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpora", "austen_emma.txt"),
             encoding="utf-8").read()[:20000]
        if os.path.exists(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpora", "austen_emma.txt"))
        else "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife. " * 200)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = tiny_config("llama", intermediate_size=64, max_position_embeddings=128)
    random_torch_model(config, seed=3).save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    (folder.parent / "calib.txt").write_text(TEXT, encoding="utf-8")
    return str(folder)


def calib_tokens(n=4, length=24, seed=0):
    return np.random.default_rng(seed).integers(3, 100, size=(n, length)).astype(np.int32)


def kept_counts_ok(weight, settings):
    d_out, d_in = weight.shape
    kept = weight != 0
    if settings.method.name == "sparsegpt" and settings.pattern is None:
        return kept.sum() == d_out * settings.budget(d_in).k  # SparseGPT: exact per layer
    if settings.pattern:
        n, m = settings.pattern
        return np.all(kept.reshape(d_out, -1, m).sum(-1) == n)
    return np.all(kept.sum(1) == settings.budget(d_in).k)


FAST = {("sparsefw", "50"), ("sparsefw", "2of4"), ("wanda", "60"), ("sparsegpt", "2of4"), ("ria", "50"),
        ("magnitude", "2of4"), ("sparsefw-published", "50"), ("sparsegpt", "50")}


def _cases():
    for method in ["magnitude", "wanda", "ria", "sparsegpt", "sparsefw", "sparsefw-published"]:
        for name, target in [("50", dict(sparsity=0.5)), ("60", dict(sparsity=0.6)), ("2of4", dict(pattern=(2, 4)))]:
            marks = () if (method, name) in FAST else (pytest.mark.slow,)
            yield pytest.param(method, target, id=f"{method}-{name}", marks=marks)


@pytest.mark.parametrize("method, target", list(_cases()))
def test_every_method_and_budget_end_to_end(tiny_folder, method, target):
    loaded = models.load_model(tiny_folder)
    method = SparseFW(options=SolverOptions(max_iter=20)) if method == "sparsefw" else method
    settings = PruneSettings(method=method, **target)
    report = prune_model(loaded, calib_tokens(), settings, progress=False)
    assert len(report.layers) == 2 * len(LINEARS)
    for name in models.linear_names(loaded.model):
        weight = np.asarray(models.get_linear_weight(loaded.model, name))
        if name.endswith(LINEARS):
            assert kept_counts_ok(weight, settings), name
    for record in report.layers:
        assert np.isfinite(record["error"]) and record["error"] >= 0
        if settings.method.name == "sparsefw":
            assert record["error"] <= record["wanda_error"] * (1 + 1e-5)
            assert record["lower_bound"] <= record["error"] * (1 + 1e-5)
        if method == "wanda":
            assert record["error"] == pytest.approx(record["wanda_error"], rel=1e-6)
    logits = models.logits(loaded.model, calib_tokens(1, 8))
    assert np.all(np.isfinite(np.asarray(logits)))


def test_reconstruction_lowers_every_layer_error(tiny_folder):
    loaded = models.load_model(tiny_folder)
    report = prune_model(loaded, calib_tokens(), PruneSettings(method="wanda", reconstruct=True), progress=False)
    for record in report.layers:
        assert record["error"] <= record["mask_error"] * (1 + 1e-4)


def test_interrupted_run_resumes_to_the_same_model(tiny_folder, tmp_path):
    settings = PruneSettings(method=SparseFW(options=SolverOptions(max_iter=15)))
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    kwargs = dict(calib=calib, nsamples=4, seqlen=32, progress=False)
    straight = str(tmp_path / "straight")
    prune_to_folder(tiny_folder, straight, settings, **kwargs)

    class Killed(Exception):
        pass

    def kill_after_first_block(b):
        if b == 0:
            raise Killed

    resumed = str(tmp_path / "resumed")
    with pytest.raises(Killed):
        prune_to_folder(tiny_folder, resumed, settings, after_block=kill_after_first_block, **kwargs)
    assert not os.path.exists(os.path.join(resumed, "prune_report.json"))  # nothing presented as finished
    assert os.path.exists(resumed + ".partial/block_0000.safetensors")
    with open(resumed + ".partial/block_0000.json") as f:
        block0_seconds = json.load(f)["seconds"]
    seen = []
    prune_to_folder(tiny_folder, resumed, settings, after_block=seen.append, **kwargs)
    assert seen == [1]  # block 0 was not pruned again
    with open(os.path.join(resumed, "prune_report.json")) as f:
        report = json.load(f)
    assert report["resumed_blocks"] == 1 and report["seconds"] > block0_seconds > 0  # the time spans both runs
    a, b = folder_tensors(straight), folder_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not os.path.exists(resumed + ".partial")
    with pytest.raises(FileExistsError):
        prune_to_folder(tiny_folder, resumed, settings, **kwargs)
    # A different setting refuses to resume somebody else's partial run.
    with pytest.raises(Killed):
        prune_to_folder(tiny_folder, str(tmp_path / "other"), settings, after_block=kill_after_first_block, **kwargs)
    with pytest.raises(ValueError, match="another model, settings or calibration(.|\n)*settings.method"):
        prune_to_folder(tiny_folder, str(tmp_path / "other"), PruneSettings(method="wanda"), **kwargs)


def test_pruned_folder_runs_in_transformers_with_the_requested_sparsity(tiny_folder, tmp_path):
    out = str(tmp_path / "pruned")
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    loaded, _ = prune_to_folder(tiny_folder, out, PruneSettings(method=SparseFW(options=SolverOptions(max_iter=10)), pattern=(2, 4)),
                                calib=calib, nsamples=4, seqlen=32, progress=False)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, module in torch_model.named_modules():
        if name.endswith(LINEARS):
            w = module.weight.detach().numpy()
            assert np.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2), name
    # Perplexity: ours on the pruned model in memory vs transformers on the saved folder.
    ours = evaluate_perplexity({"pruned": loaded}, [TEXT[:4000]], seqlen=32)["pruned"]
    tok = char_tokenizer()
    ids = tok(TEXT[:4000], add_special_tokens=False)["input_ids"]
    windows = np.array(ids[: len(ids) // 32 * 32]).reshape(-1, 32)
    with torch.no_grad():
        logits = torch_model(torch.as_tensor(windows)).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                torch.as_tensor(windows[:, 1:]).reshape(-1))
    assert ours == pytest.approx(float(torch.exp(nll)), rel=5e-3)
    report = json.load(open(os.path.join(out, "prune_report.json")))
    assert report["summary"]["layers"] == 14
    assert os.path.getsize(os.path.join(out, "error_reduction.png")) > 1000
    assert os.path.getsize(os.path.join(out, "convergence.png")) > 1000


def test_command_line_prune_and_eval(tiny_folder, tmp_path, capsys):
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    out = str(tmp_path / "cli")
    code = cli_main(["prune", tiny_folder, "--method", "wanda", "--sparsity", "0.5", "--out", out,
                     "--calib", calib, "--nsamples", "2", "--seqlen", "16"])
    assert code == 0
    assert "saved to" in capsys.readouterr().out
    code = cli_main(["eval", tiny_folder, out, "--data", calib, "--seqlen", "32", "--max-windows", "4"])
    assert code == 0
    table = capsys.readouterr().out
    assert "cli" in table and "ppl" in table
    fw_out = str(tmp_path / "fw")
    code = cli_main(["prune", tiny_folder, "--sparsity", "0.5", "--out", fw_out, "--calib", calib,
                     "--nsamples", "2", "--seqlen", "16", "--max-iter", "5", "--certify", "20"])
    assert code == 0
    report = json.loads((tmp_path / "fw" / "prune_report.json").read_text())
    assert report["settings"]["method"] == "sparsefw" and report["settings"]["certify_iter"] == 20
    assert report["settings"]["shrinkage"] == 0.5  # sparsefw's default, recorded as resolved
    for layer in report["layers"]:
        assert layer["lower_bound"] >= 0
        assert_le(layer["lower_bound"], layer["error"], rtol=1e-4)  # float32 layer errors
    code = cli_main(["prune", tiny_folder, "--out", str(tmp_path / "x"), "--calib", str(tmp_path / "missing.txt")])
    assert code == 2
    assert "missing.txt" in capsys.readouterr().err


def test_main_job_prints_dense_wanda_sparsefw_table(tiny_folder, tmp_path, capsys):
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    args = ["demo", "--model", tiny_folder, "--calib", calib, "--nsamples", "2", "--seqlen", "16",
            "--max-iter", "10", "--eval", calib, "--eval-seqlen", "32", "--max-windows", "2",
            "--out", str(tmp_path / "demo")]
    assert cli_main(args) == 0
    table = capsys.readouterr().out
    for name in ("dense", "wanda", "sparsefw"):
        assert name in table
    assert cli_main(args) == 0  # a second run reuses the pruned folders


def test_shrinkage_interpolates_between_the_calibration_error_and_wanda():
    from fw_jax.pipeline import prune_layer
    from solver_problems import correlated_problem

    weight, gram = correlated_problem(np.random.default_rng(0), 12, 32, dtype=np.float32)
    errors = {}
    for rho in (0.0, 0.5, 1.0):
        _, record = prune_layer(weight, gram, PruneSettings(method=SparseFW(alpha=0.0), sparsity=0.5, shrinkage=rho))
        errors[rho] = record["error"]
        assert ("shrunk_certificate" in record) == (rho > 0)
        assert 0 <= record["lower_bound"] <= record["error"] * (1 + 1e-5)  # always on G itself
        assert record["certificate"] == pytest.approx(1 - record["lower_bound"] / record["error"], abs=1e-5)
    wanda = record["wanda_error"]
    # ρ = 1: a separable problem, where Wanda's mask is optimal; ρ = 0 is best on G itself.
    assert errors[1.0] == pytest.approx(wanda, rel=1e-5)
    assert_le(errors[0.0], errors[0.5], rtol=1e-6)
    assert errors[0.5] < wanda
    with pytest.raises(ValueError, match="shrinkage"):
        PruneSettings(shrinkage=1.5)

def test_shrunk_reconstruction_moves_from_the_full_refit_to_the_plain_mask():
    from fw_jax.pipeline import prune_layer
    from solver_problems import correlated_problem

    weight, gram = correlated_problem(np.random.default_rng(1), 10, 24, dtype=np.float32)
    _, plain = prune_layer(weight, gram, PruneSettings(method="wanda", sparsity=0.5))
    errors = {}
    for rho in (0.0, 0.5, 1.0):
        _, record = prune_layer(weight, gram, PruneSettings(method="wanda", sparsity=0.5, reconstruct=True, shrinkage=rho))
        errors[rho] = record["error"]
        assert record["mask_error"] == pytest.approx(plain["error"], rel=1e-6)  # same Wanda mask
    # The refit minimises (1 − ρ)·(error on G) + ρ·(error on diag G, least at the plain mask):
    # its error on G rises with ρ, and at ρ = 1 the refit keeps the weights as they are.
    assert_le(errors[0.0], errors[0.5], rtol=1e-4)  # float32 refits
    assert_le(errors[0.5], plain["error"], rtol=1e-4)
    assert errors[0.0] < 0.9 * plain["error"]
    assert errors[1.0] == pytest.approx(plain["error"], rel=1e-4)


def test_certify_iterations_prove_a_better_bound_without_changing_the_mask():
    from fw_jax.pipeline import prune_layer
    from solver_problems import best_row_error, correlated_problem

    weight, gram = correlated_problem(np.random.default_rng(4), 4, 12, dtype=np.float32)
    best = sum(best_row_error(weight[i].astype(np.float64), gram.astype(np.float64), 6) for i in range(4))
    plain_weights, plain = prune_layer(weight, gram, PruneSettings(sparsity=0.5))  # α = 0.9, ρ = 0.5
    certified_weights, certified = prune_layer(weight, gram, PruneSettings(method=SparseFW(certify_iter=200), sparsity=0.5))
    np.testing.assert_array_equal(np.asarray(plain_weights), np.asarray(certified_weights))
    assert plain["lower_bound"] <= certified["lower_bound"]  # the larger of the two bounds, exactly
    assert_le(certified["lower_bound"], best, rtol=1e-4)  # float32 bound vs float64 enumeration
    assert certified["lower_bound"] > 0.3 * best and certified["certificate"] < plain["certificate"]
    with pytest.raises(ValueError, match="certify_iter"):
        SparseFW(certify_iter=-1)


def test_progress_says_when_a_layer_has_no_useful_bound(tiny_folder, capsys):
    from fw_jax._progress import VERBOSE, Progress

    loaded = models.load_model(tiny_folder)
    records = prune_model(loaded, calib_tokens(), PruneSettings(method=SparseFW(options=SolverOptions(max_iter=10)), sparsity=0.5),
                          progress=Progress(VERBOSE)).layers
    err = capsys.readouterr().err
    assert "--certify N" in err  # the default (α = 0.9, ρ = 0.5) is told how to get a bound
    certified = prune_model(models.load_model(tiny_folder), calib_tokens(),
                            PruneSettings(method=SparseFW(options=SolverOptions(max_iter=10), certify_iter=20), sparsity=0.5), progress=Progress(VERBOSE)).layers
    certified_err = capsys.readouterr().err
    assert "--certify N" not in certified_err
    # Both branches are exercised: the default leaves some layer without a bound, --certify proves one.
    assert any(r["lower_bound"] <= 0 for r in records) and any(r["lower_bound"] > 0 for r in certified)
    for text, layer_records in ((err, records), (certified_err, certified)):
        lines = [line for line in text.splitlines() if line.strip().startswith("model.layers")]
        assert len(lines) == len(layer_records)
        for b in {r["block"] for r in layer_records}:  # the block's summary counts the proved bounds
            proved = [r for r in layer_records if r["block"] == b and r["lower_bound"] > 0]
            summary = next(line for line in text.splitlines() if line.startswith(f"block {b}: "))
            assert (f"bound proved for {len(proved)}/7 layers" if proved else "no bound proved") in summary
        for line, record in zip(lines, layer_records):
            if record["lower_bound"] > 0:
                assert line.rstrip().endswith(f"cert {record['certificate']:.2f}")
            else:  # a bound ≤ 0 proves nothing and is shown as such
                assert line.rstrip().endswith("cert -")


def test_atomic_write_replaces_whole_files_and_leaves_the_old_one_on_failure(tmp_path, monkeypatch):
    from fw_jax.pipeline import atomic_write

    path = tmp_path / "results.json"
    atomic_write(path, "first ✓")
    assert path.read_text(encoding="utf-8") == "first ✓"
    atomic_write(str(path), b"second")
    assert path.read_bytes() == b"second"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)  # dies after the temporary file is written, before the rename
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "third")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_checkpoints_of_the_float32_npz_format_are_refused_not_misread(tiny_folder, tmp_path):
    # An early fw_jax checkpointed blocks as float32 .npz (run record version 1); those cannot be
    # resumed by the shard format, so the run says it is an earlier version's instead of failing on
    # a missing file.
    settings = PruneSettings(method="wanda")
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    out = str(tmp_path / "out")

    def stop(b):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_to_folder(tiny_folder, out, settings, calib=calib, nsamples=2, seqlen=16, progress=False,
                        after_block=stop)
    state = os.path.join(out + ".partial", "state.json")
    saved = json.load(open(state))
    del saved["run"]["version"]  # as the .npz version wrote it: neither a version nor a checkpoint format
    saved["fingerprint"] = "0" * 16
    open(state, "w").write(json.dumps(saved))
    with pytest.raises(ValueError, match=f"earlier fw_jax [(]run record version 1; this fw_jax writes version {identity.RUN_VERSION}[)]"
                                         ".*--overwrite"):
        prune_to_folder(tiny_folder, out, settings, calib=calib, nsamples=2, seqlen=16, progress=False)

"""Out of core and in the checkpoint's own dtype: streamed loading, sharded bfloat16 output,
resume, bad shards and a disk that fills up (issue 16)."""

from __future__ import annotations

import errno
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from fw_jax import SolverOptions
from fw_jax import models
from fw_jax.cli import main as cli_main
from fw_jax.models import _safetensors
from fw_jax.pipeline import PruneSettings, evaluate_perplexity, prune_model, prune_to_folder
from fw_jax.pipeline import SparseFW
from fw_jax.pipeline.data import calibration_tokens, load_documents
from models_fixtures import folder_tensors, random_torch_model, tiny_config
from test_pipeline_data import char_tokenizer
from test_pipeline_prune import LINEARS, TEXT

BLOCKS = 3


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A 3-block LLaMA in bfloat16, sharded by transformers (several shards and an index)."""
    folder = tmp_path_factory.mktemp("bf16") / "model"
    config = tiny_config("llama", intermediate_size=64, max_position_embeddings=128, num_hidden_layers=BLOCKS)
    model = random_torch_model(config, seed=5).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="20KB")
    char_tokenizer().save_pretrained(folder)
    (folder.parent / "calib.txt").write_text(TEXT, encoding="utf-8")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return str(folder)


def _calib(folder):
    return os.path.join(os.path.dirname(folder), "calib.txt")


def _resident_blocks(loaded) -> set[int]:
    """Blocks whose parameters are in memory (not shapes only)."""
    resident = set()
    for b in range(models.num_blocks(loaded.model)):
        prefix = f"{loaded.model.block_path}.{b}."
        for name in models.param_names(loaded.model):
            if name.startswith(prefix) and isinstance(models.get_param(loaded.model, name), jax.Array):
                resident.add(b)
    return resident


def test_a_streamed_model_holds_at_most_one_block(bf16_folder, monkeypatch):
    loaded = models.load_model(bf16_folder, dtype="auto", stream=True)
    assert loaded.streamed and _resident_blocks(loaded) == set()
    assert loaded.dtypes["model.layers.0.mlp.up_proj.weight"] == "bfloat16"
    seen = []
    real_load = models.load_block

    def load_block(lm, b, tensors=None):
        seen.append((b, _resident_blocks(lm)))  # what is in memory when the next block is read
        real_load(lm, b, tensors)

    monkeypatch.setattr(models, "load_block", load_block)
    tokens = np.random.default_rng(0).integers(3, 100, size=(2, 16)).astype(np.int32)
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        prune_model(loaded, tokens, PruneSettings(method="wanda"), work_dir=work, progress=False)
    assert seen == [(b, set()) for b in range(BLOCKS)]
    assert _resident_blocks(loaded) == set()
    # the embeddings and head are not needed once the tokens are embedded: dropped, read again on demand
    assert not models.is_resident(loaded, "model.embed_tokens.weight")
    models.load_rest(loaded)
    assert models.is_resident(loaded, "model.embed_tokens.weight")
    with pytest.raises(ValueError, match="streamed .* needs work_dir"):
        prune_model(loaded, tokens, PruneSettings(method="wanda"), progress=False)


def test_a_bfloat16_checkpoint_is_pruned_into_bfloat16_shards_transformers_loads(bf16_folder, tmp_path):
    out = tmp_path / "out"
    prune_to_folder(bf16_folder, str(out), PruneSettings(method="wanda", sparsity=0.5), calib=_calib(bf16_folder),
                    nsamples=2, seqlen=16, progress=False)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{BLOCKS + 1:05d}.safetensors" for i in range(1, BLOCKS + 2)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    before, after = folder_tensors(bf16_folder), folder_tensors(str(out))
    assert set(index["weight_map"]) == set(after) == set(before)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in after.values())
    for name, value in after.items():
        assert value.dtype == ml_dtypes.bfloat16, name
        if name.endswith(tuple(f"{l}.weight" for l in LINEARS)):  # pruned: kept entries are the input's bits
            kept = value != 0
            assert 0.45 < kept.mean() < 0.55, name
            np.testing.assert_array_equal(value.view(np.int16)[kept], before[name].view(np.int16)[kept])
        else:  # never pruned: bit-identical
            np.testing.assert_array_equal(value.view(np.int16), before[name].view(np.int16), err_msg=name)
    size = lambda folder: sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                              if f.endswith(".safetensors"))
    assert abs(size(str(out)) - size(bf16_folder)) < 0.1 * size(bf16_folder)  # not twice the input
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(torch_model.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():  # and runs
        assert torch.isfinite(torch_model(torch.tensor([[1, 5, 9, 12]])).logits).all()


@pytest.mark.parametrize("dtype, expected", [("float32", np.float32), ("float16", np.float16)])
def test_dtype_asks_for_another_output_dtype(bf16_folder, tmp_path, dtype, expected):
    out = tmp_path / "out"
    assert cli_main(["prune", bf16_folder, "--out", str(out), "--method", "wanda", "--calib", _calib(bf16_folder),
                     "--nsamples", "2", "--seqlen", "16", "--dtype", dtype, "-q"]) == 0
    after = folder_tensors(str(out))
    assert {v.dtype for v in after.values()} == {np.dtype(expected)}
    before = folder_tensors(bf16_folder)
    norm = "model.layers.1.input_layernorm.weight"  # bfloat16 values are exact in both
    np.testing.assert_array_equal(after[norm], before[norm].astype(np.float32).astype(expected))


def test_streamed_pruning_equals_pruning_in_memory(bf16_folder, tmp_path):
    settings = PruneSettings(method=SparseFW(options=SolverOptions(max_iter=8)), reconstruct=True)  # reconstruction: rounding matters
    out = tmp_path / "streamed"
    prune_to_folder(bf16_folder, str(out), settings, calib=_calib(bf16_folder), nsamples=2, seqlen=16, progress=False)
    in_memory = models.load_model(bf16_folder, dtype="auto")
    assert not in_memory.streamed
    tokens = calibration_tokens(in_memory.tokenizer, load_documents(_calib(bf16_folder)), 2, 16, 0,
                                source=_calib(bf16_folder))
    prune_model(in_memory, tokens, settings, progress=False)
    models.save_hf_folder(in_memory, tmp_path / "in_memory")
    a, b = folder_tensors(str(out)), folder_tensors(str(tmp_path / "in_memory"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].view(np.int16), b[name].view(np.int16), err_msg=name)


def test_a_killed_bfloat16_run_resumes_bit_for_bit(bf16_folder, tmp_path):
    settings = PruneSettings(method="sparsegpt")  # updates the kept weights: they are rounded to bfloat16
    kwargs = dict(calib=_calib(bf16_folder), nsamples=2, seqlen=16, progress=False)
    straight = tmp_path / "straight"
    prune_to_folder(bf16_folder, str(straight), settings, **kwargs)

    def kill(b):
        if b == 1:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prune_to_folder(bf16_folder, str(resumed), settings, after_block=kill, **kwargs)
    partial = resumed.parent / "resumed.partial"
    assert sorted(p.name for p in partial.glob("block_*.safetensors")) == ["block_0000.safetensors",
                                                                        "block_0001.safetensors"]
    seen = []
    prune_to_folder(bf16_folder, str(resumed), settings, after_block=seen.append, **kwargs)
    assert seen == [2]
    a, b = folder_tensors(str(straight)), folder_tensors(str(resumed))
    for name in a:
        np.testing.assert_array_equal(a[name].view(np.int16), b[name].view(np.int16), err_msg=name)


def test_streamed_perplexity_equals_in_memory_perplexity(bf16_folder):
    docs = [TEXT[:3000]]
    streamed = evaluate_perplexity({"m": models.load_model(bf16_folder, stream=True)}, docs, seqlen=32)["m"]
    whole = evaluate_perplexity({"m": models.load_model(bf16_folder)}, docs, seqlen=32)["m"]
    assert streamed == pytest.approx(whole, rel=1e-5)


def test_an_index_naming_a_tensor_no_shard_has_is_refused(bf16_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bf16_folder, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = sorted(set(index["weight_map"].values()))[0]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(models.CheckpointError, match="missing tensor 'model.layers.9.mlp.up_proj.weight' listed in the index"):
        models.load_model(broken, stream=True)


def test_a_disk_that_fills_up_mid_write_leaves_a_clear_error_and_no_finished_output(bf16_folder, tmp_path, capsys,
                                                                                    monkeypatch):
    before = {f: os.path.getmtime(os.path.join(bf16_folder, f)) for f in os.listdir(bf16_folder)}
    real = _safetensors.write_safetensors
    calls = []

    def full_disk(path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:  # the second block's shard
            with open(path, "wb") as f:
                f.write(b"partial")
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise _safetensors.WriteError(path, full) from full  # as the real writer raises it
        return real(path, *args, **kw)

    monkeypatch.setattr(_safetensors, "write_safetensors", full_disk)
    monkeypatch.setattr("fw_jax.models._shards.write_safetensors", full_disk)
    out = tmp_path / "out"
    argv = ["prune", bf16_folder, "--out", str(out), "--method", "wanda", "--calib", _calib(bf16_folder),
            "--nsamples", "2", "--seqlen", "16", "-q"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the disk is full" in err and "block_0001.safetensors" in err, err
    assert not out.exists()  # nothing presented as finished
    partial = tmp_path / "out.partial"
    assert sorted(p.name for p in partial.glob("block_*")) == ["block_0000.json", "block_0000.safetensors"]
    assert before == {f: os.path.getmtime(os.path.join(bf16_folder, f)) for f in os.listdir(bf16_folder)}
    monkeypatch.setattr(_safetensors, "write_safetensors", real)
    monkeypatch.setattr("fw_jax.models._shards.write_safetensors", real)
    assert cli_main(argv) == 0  # space freed: the same command resumes and finishes
    assert (out / "model.safetensors.index.json").exists() and not partial.exists()


@pytest.mark.parametrize("format, written", [(None, "flax_model.msgpack"), ("hf", "model.safetensors.index.json")])
def test_a_flax_checkpoint_is_pruned_into_flax_unless_asked(bf16_folder, tmp_path, format, written):
    flax_in = tmp_path / "flax_in"
    models.save_flax_folder(models.load_model(bf16_folder), flax_in)
    out = tmp_path / "out"
    argv = ["prune", str(flax_in), "--out", str(out), "--method", "wanda", "--calib", _calib(bf16_folder),
            "--nsamples", "2", "--seqlen", "16", "-q"] + (["--format", format] if format else [])
    assert cli_main(argv) == 0
    assert (out / written).exists()
    pruned = models.load_model(out)
    w = np.asarray(models.get_linear_weight(pruned.model, "model.layers.2.mlp.up_proj"))
    assert (w == 0).mean() == pytest.approx(0.5, abs=0.05)


def test_hidden_states_can_be_kept_in_bfloat16(bf16_folder, tmp_path, monkeypatch):
    kwargs = dict(calib=_calib(bf16_folder), nsamples=2, seqlen=16, progress=False)
    settings = PruneSettings(method="wanda")
    _, full = prune_to_folder(bf16_folder, str(tmp_path / "f32"), settings, **kwargs)
    seen = []
    real = models.block_grams

    def block_grams(model, b, hidden, **kw):
        seen.append(hidden.dtype)
        return real(model, b, hidden, **kw)

    monkeypatch.setattr(models, "block_grams", block_grams)
    _, half = prune_to_folder(bf16_folder, str(tmp_path / "bf16"), settings, hidden_dtype="bfloat16", **kwargs)
    assert seen == [jax.numpy.bfloat16] * BLOCKS  # what each block was calibrated on, held between blocks
    assert half.calibration["hidden_dtype"] == "bfloat16" and "hidden_dtype" not in full.calibration
    a, b = folder_tensors(str(tmp_path / "f32")), folder_tensors(str(tmp_path / "bf16"))
    for name in a:  # Wanda's masks depend on the inputs' norms only: nearly all equal
        if name.endswith("mlp.down_proj.weight"):
            assert ((a[name] != 0) == (b[name] != 0)).mean() > 0.9
    with pytest.raises(ValueError, match="hidden_dtype must be one of float32, bfloat16"):
        prune_to_folder(bf16_folder, str(tmp_path / "x"), settings, hidden_dtype="float16", **kwargs)


def test_a_quantized_gguf_streams_and_is_written_in_bfloat16(tmp_path):
    from models_fixtures import write_tiny_gguf

    config = tiny_config("llama", hidden_size=64, intermediate_size=96, max_position_embeddings=128,
                         num_hidden_layers=BLOCKS)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(random_torch_model(config, seed=7), config, path)  # MLP weights in Q8_0
    streamed, whole = models.load_model(path, stream=True, tokenizer=False), models.load_model(path, tokenizer=False)
    assert streamed.streamed and streamed.dtypes["model.layers.0.mlp.up_proj.weight"] == "Q8_0"
    assert streamed.output_dtype("model.layers.0.mlp.up_proj.weight") == ml_dtypes.bfloat16
    ids = np.random.default_rng(0).integers(3, 100, size=(120,))
    from fw_jax.models import perplexity

    assert perplexity(streamed, ids, 24) == pytest.approx(perplexity(whole.model, ids, 24), rel=1e-6)
    tokens = np.random.default_rng(1).integers(3, 100, size=(2, 16)).astype(np.int32)
    work = tmp_path / "work"
    prune_model(streamed, tokens, PruneSettings(method="wanda"), work_dir=str(work), progress=False)
    prune_model(whole, tokens, PruneSettings(method="wanda"), progress=False)
    for b in range(BLOCKS):
        shard = models.read_block_shard(streamed, work / f"block_{b:04d}.safetensors")
        name = f"model.layers.{b}.mlp.up_proj.weight"
        assert shard[name].dtype == ml_dtypes.bfloat16
        # in memory, unrounded (dtype=None): the shard is the same weights rounded to bfloat16
        expected = np.asarray(models.get_param(whole.model, name)).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(shard[name].view(np.int16), expected.view(np.int16))

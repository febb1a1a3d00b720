"""Bad checkpoints raise CheckpointError (a ValueError) naming the file and the problem."""

import json
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy
from models_fixtures import random_torch_model, tiny_config, write_tiny_gguf

import fw_jax.models as fm


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    config = tiny_config("llama", hidden_size=64, intermediate_size=96)
    torch_model = random_torch_model(config)
    torch_model.save_pretrained(folder)
    write_tiny_gguf(torch_model, config, folder / "tiny.gguf")
    return folder


def _copy(good, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(good, out)
    return out


def test_error_is_a_value_error():
    assert issubclass(fm.CheckpointError, ValueError)
    assert issubclass(fm.UnsupportedModelError, fm.CheckpointError)


@pytest.mark.parametrize("keep", [4, 100, 0.5, 0.99])
def test_truncated_safetensors(good, tmp_path, keep):
    folder = _copy(good, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(
        fm.CheckpointError, match="model.safetensors.*(truncated|corrupted)"
    ) as info:
        fm.load_model(folder)
    assert info.value.path == str(path)


def test_corrupted_safetensors_header(good, tmp_path):
    folder = _copy(good, tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(fm.CheckpointError, match="model.safetensors: corrupted safetensors header"):
        fm.load_model(folder)


def _rewrite(path, edit):
    tensors = dict(safetensors.numpy.load_file(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, path)


def test_missing_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    _rewrite(folder / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(
        fm.CheckpointError, match="missing tensors: model.layers.1.mlp.down_proj.weight"
    ):
        fm.load_model(folder)


def test_shape_mismatch(good, tmp_path):
    folder = _copy(good, tmp_path)

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((7, 64), np.float32)

    _rewrite(folder / "model.safetensors", edit)
    with pytest.raises(
        fm.CheckpointError,
        match=r"model.safetensors: shape mismatch for 'model.layers.0.self_attn.k_proj.weight'",
    ):
        fm.load_model(folder)


def test_unexpected_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    _rewrite(folder / "model.safetensors", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(fm.CheckpointError, match="unexpected tensor 'extra'"):
        fm.load_model(folder)


@pytest.mark.parametrize("model_type", ["bert", "no_such_model"])
def test_unknown_architecture(good, tmp_path, model_type):
    folder = _copy(good, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fm.UnsupportedModelError, match=rf"config.json: .*{model_type}"):
        fm.load_model(folder)


def test_missing_files(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(fm.CheckpointError, match="no model.safetensors"):
        fm.load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(fm.CheckpointError, match="no config.json"):
        fm.load_model(folder)
    with pytest.raises(fm.CheckpointError, match="no such file"):
        fm.load_model(tmp_path / "nothing.gguf")


def test_missing_shard(good, tmp_path):
    folder = tmp_path / "sharded"
    random_torch_model(tiny_config("llama")).save_pretrained(folder, max_shard_size="20KB")
    next(folder.glob("model-*.safetensors")).unlink()
    with pytest.raises(fm.CheckpointError, match="index.json: shard .* is missing"):
        fm.load_model(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf(good, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    data = (good / "tiny.gguf").read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(fm.CheckpointError, match="cut.gguf: .*(corrupted|truncated|dequantize)"):
        fm.load_model(path, tokenizer=False)


def test_garbage_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(fm.CheckpointError, match="garbage.gguf"):
        fm.load_model(path, tokenizer=False)
    path.write_bytes(b"")
    with pytest.raises(fm.CheckpointError, match="garbage.gguf"):
        fm.load_model(path, tokenizer=False)


def _gguf_with_metadata(path, **edits):
    """A tiny LLaMA GGUF whose metadata is the usual, with ``edits`` (key ``a__b`` for ``a.b``):
    a value replaces the field (its GGUF type follows the Python type), ``None`` drops it."""
    import gguf

    fields = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.embedding_length": 8,
        "llama.feed_forward_length": 16,
        "llama.attention.head_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }
    fields.update({key.replace("__", "."): value for key, value in edits.items()})
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.kv_data[0].pop("general.architecture")  # written with the others, or left out
    for key, value in fields.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif value is not None:
            writer.add_int32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((11, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "edits, message",
    [
        (dict(llama__embedding_length=None), "'llama.embedding_length' is missing; expected a positive integer"),
        (dict(llama__attention__head_count="four"), "'llama.attention.head_count' is 'four'; expected a positive integer"),
        (dict(llama__block_count=0), "'llama.block_count' is 0; expected a positive integer"),
        (dict(llama__attention__layer_norm_rms_epsilon=-1.0), "layer_norm_rms_epsilon' is -1.0; expected a positive number"),
        (dict(llama__rope__freq_base=float("nan")), "'llama.rope.freq_base' is nan; expected a positive number"),
        (dict(tokenizer__ggml__bos_token_id=-3), "'tokenizer.ggml.bos_token_id' is -3; expected a non-negative integer"),
        (dict(general__architecture=None), "'general.architecture' is missing; expected a string"),
        (dict(general__architecture=5), "'general.architecture' is 5; expected a string"),
    ],
)
def test_bad_gguf_metadata_names_file_field_and_form(tmp_path, edits, message):
    path = _gguf_with_metadata(tmp_path / "meta.gguf", **edits)
    with pytest.raises(fm.CheckpointError, match=r"meta\.gguf: GGUF metadata .*" + re.escape(message)) as info:
        fm.load_model(path, tokenizer=False)
    assert info.value.path == str(path)

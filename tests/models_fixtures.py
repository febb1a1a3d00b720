"""Tiny random transformers models (PyTorch) for the fw_jax.models tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 101


def tiny_config(family: str, **overrides):
    """A few-layer, small-width ``transformers`` config of one architecture."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        cfg = dict(
            common,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        )
        return transformers.LlamaConfig(**{**cfg, **overrides})
    if family == "llama3":  # llama3 rope scaling, tied head, biases everywhere
        cfg = dict(
            common,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
        return transformers.LlamaConfig(**{**cfg, **overrides})
    if family == "qwen2":
        cfg = dict(
            common,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        return transformers.Qwen2Config(**{**cfg, **overrides})
    if family == "mistral":
        cfg = dict(common, head_dim=16, sliding_window=6, tie_word_embeddings=False)
        return transformers.MistralConfig(**{**cfg, **overrides})
    if family == "gpt2":
        cfg = dict(
            vocab_size=VOCAB,
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=1,
            eos_token_id=2,
        )
        return transformers.GPT2Config(**{**cfg, **overrides})
    if family == "gemma3":  # 2 local layers (window 4) then 1 global; logit soft-capping
        cfg = dict(
            common,
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            },
        )
        return transformers.Gemma3TextConfig(**{**cfg, **overrides})
    raise ValueError(family)


def random_torch_model(config, seed: int = 0):
    """A float32 torch model whose every parameter (biases, norms too) is random."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gemma" in config.model_type and p.ndim == 1:  # norms scale by (1 + w)
                p.copy_(0.2 * torch.randn_like(p))
            elif p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def token_ids(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, size=(batch, length)).astype(np.int32)


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf does to q/k rows: rotate-half → adjacent pairs.
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(torch_model, config, path, quantize_mlp: bool = True) -> None:
    """Write a LLaMA or Gemma 3 torch model as a llama.cpp-style GGUF.

    LLaMA q/k rows are permuted for adjacent-pair RoPE (Gemma uses rotate-half, no permutation)
    and Gemma norms are stored as ``1 + w``, as
    llama.cpp's converter does. MLP weights are stored as Q8_0 and replaced in ``torch_model``
    by their Q8_0 round trip, so the torch model is the exact reference for the file.
    """
    import gguf

    gemma = config.model_type == "gemma3_text"
    arch = "gemma3" if gemma else "llama"
    hf_to_gguf = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    if gemma:
        hf_to_gguf.update(
            {
                "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm",
                "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm",
            }
        )
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if gemma:
        writer.add_rope_freq_base(float(config.rope_parameters["full_attention"]["rope_theta"]))
        writer.add_sliding_window(config.sliding_window)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    else:
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            w = p.detach().numpy().astype(np.float32)
            if name == "model.embed_tokens.weight":
                gname = "token_embd.weight"
            elif name == "model.norm.weight":
                gname = "output_norm.weight"
            elif name == "lm_head.weight":
                gname = "output.weight"
            else:
                parts = name.split(".")
                block, module = parts[2], ".".join(parts[3:-1])
                gname = f"blk.{block}.{hf_to_gguf[module]}.{parts[-1]}"
            if gemma and gname.endswith("norm.weight"):
                w = w + 1.0
            elif not gemma and ".attn_q." in gname:
                w = _llama_cpp_permute(w, config.num_attention_heads)
            elif not gemma and ".attn_k." in gname:
                w = _llama_cpp_permute(w, config.num_key_value_heads)
            if quantize_mlp and ".ffn_" in gname and w.ndim == 2:
                q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
                writer.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(gname, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def folder_tensors(folder) -> dict:
    """Every tensor of a Hugging Face folder (one file or sharded with an index), read with the
    ``safetensors`` package (independent of fw_jax's reader), as numpy arrays of their own
    dtype (bfloat16 through ml_dtypes, bits unchanged)."""
    import json
    import os

    import ml_dtypes
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        for key, value in load_file(os.path.join(folder, name)).items():
            if value.dtype == torch.bfloat16:
                out[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[key] = value.numpy()
    return out

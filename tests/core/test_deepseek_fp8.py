"""Block-FP8 checkpoints as DeepSeek-V3 ships them: quantized here from a transformers-written
checkpoint, loaded by us (dequantized at load), and equal to transformers run on the same
dequantized weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.core import quant
from services.core.checkpoint import CheckpointIndex
from services.core.generate import generate
from services.core.model import AttentionSide, MonolithicModel
from services.core.request import SamplingParams
from services.errors import CheckpointError

BLOCK = [16, 16]  # tiny model: several blocks per weight, some of them partial
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 141))]
N = 24


def quantizable(key: str, t: torch.Tensor) -> bool:
    """What DeepSeek-V3 quantizes: every linear projection but the router and the LM head."""
    return (t.dim() == 2 and key.endswith("_proj.weight") or key.endswith("_mqa.weight"))


def reference_dequant(w8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Independent of services/core/quant.py: loop over blocks."""
    out = torch.empty(w8.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            r, c = slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])
            out[r, c] = w8[r, c].float() * s[i, j]
    return out


@pytest.fixture(scope="module")
def fp8_pair(deepseek_ckpt, tmp_path_factory):
    """(FP8 sharded checkpoint, fp32 checkpoint of its dequantized weights)."""
    src = deepseek_ckpt("v3")
    tensors = load_file(str(src / "model.safetensors"))
    spec = quant.FP8BlockSpec(block=tuple(BLOCK))
    q8, deq = {}, {}
    for k, t in tensors.items():
        if quantizable(k, t):
            w8, s = quant.quantize(t, spec)
            q8[k], q8[k + "_scale_inv"] = w8, s
            deq[k] = reference_dequant(w8, s)
        else:
            q8[k] = deq[k] = t
    assert sum(t.dtype == torch.float8_e4m3fn for t in q8.values()) > 30
    cfg = json.loads((src / "config.json").read_text())
    fp8 = tmp_path_factory.mktemp("fp8")
    keys = sorted(q8)
    weight_map = {}
    for s, part in enumerate((keys[::2], keys[1::2])):  # two shards + index, scales anywhere
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: q8[k] for k in part}, str(fp8 / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    (fp8 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": BLOCK}}))
    ref = tmp_path_factory.mktemp("fp8-dequantized")
    shutil.copy(src / "config.json", ref / "config.json")
    save_file(deq, str(ref / "model.safetensors"), metadata={"format": "pt"})
    return fp8, ref, deq


def test_fp8_checkpoint_equals_transformers_on_the_dequantized_weights(fp8_pair, hf_greedy):
    fp8, ref, deq = fp8_pair
    model = MonolithicModel.from_pretrained(fp8)
    # dequantized at load, bit for bit what the block formula gives
    mla = model.attention.w.layers[1].mla
    assert torch.equal(mla.kv_b, deq["model.layers.1.self_attn.kv_b_proj.weight"])
    assert torch.equal(mla.q_a, deq["model.layers.1.self_attn.q_a_proj.weight"])
    got = generate(model, PROMPTS, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True),
                   block_size=4)
    assert got == hf_greedy(ref, PROMPTS, N)


def test_bfloat16_load_dequantizes_then_rounds_once(fp8_pair):
    fp8, _, deq = fp8_pair
    attn = AttentionSide.from_pretrained(fp8, dtype=torch.bfloat16)
    w = attn.w.layers[0].dense_gate_up
    want = torch.cat([deq["model.layers.0.mlp.gate_proj.weight"],
                      deq["model.layers.0.mlp.up_proj.weight"]]).to(torch.bfloat16)
    assert w.dtype == torch.bfloat16 and torch.equal(w, want)


def test_quantize_dequantize_roundtrip_and_bad_scales():
    spec = quant.FP8BlockSpec(block=(4, 8))
    w = torch.randn(10, 20)
    w8, s = quant.quantize(w, spec)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    back = quant.dequantize(w8, s, spec, torch.float32)
    assert (back - w).abs().max() <= 0.07 * w.abs().max()  # e4m3: 3 mantissa bits
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[2, 3\], expected \[3, 3\]"):
        quant.dequantize(w8, s[:2], spec, torch.float32)


def test_missing_scale_is_a_checkpoint_error(fp8_pair, tmp_path):
    fp8 = fp8_pair[0]
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    del index["weight_map"][key]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="kv_b_proj.weight_scale_inv' is missing"):
        AttentionSide.from_pretrained(bad)
    # a shard the index names but that is not there
    index["weight_map"][key] = "model-00009-of-00009.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors' is missing"):
        CheckpointIndex.open(bad)

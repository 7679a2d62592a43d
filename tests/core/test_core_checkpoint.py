"""Role-split checkpoint loading: each side reads only its tensors; bad checkpoints are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.core.checkpoint import CheckpointIndex, load_attention_weights, load_expert_weights
from services.core.config import ModelConfig
from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.request import SamplingParams
from services.errors import CheckpointError


def test_attention_side_never_reads_expert_tensors(ckpt_factory):
    path = ckpt_factory("qwen3_dense")
    cfg = ModelConfig.from_pretrained(path)
    idx = CheckpointIndex.open(path)
    w = load_attention_weights(path, cfg, torch.float32, "cpu", idx)
    assert idx.requested and not [k for k in idx.requested if ".experts." in k]
    assert any(".mlp.gate.weight" in k for k in idx.requested)  # routers live here
    assert any(".mlp.gate_proj.weight" in k for k in idx.requested)  # dense layer 1 too
    assert w.layers[1].router is None and w.layers[1].dense_gate_up is not None
    idx2 = CheckpointIndex.open(path)
    ew = load_expert_weights(path, cfg, [4, 1], torch.float32, "cpu", idx2)
    assert {int(k.split(".experts.")[1].split(".")[0]) for k in idx2.requested} == {1, 4}
    assert all(".experts." in k for k in idx2.requested)
    assert set(ew.gate_up) == {0, 2}  # sparse layers only
    assert ew.gate_up[0].shape == (2, 2 * 48, 64) and ew.down[2].shape == (2, 64, 48)


def test_sharded_and_fused_layouts_load_identically(ckpt_factory, tmp_path):
    base = ckpt_factory("mixtral")
    sharded = ckpt_factory("mixtral", shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    # Fused layout (transformers' in-memory naming): experts.gate_up_proj / experts.down_proj.
    fused = tmp_path / "fused"
    shutil.copytree(base, fused)
    t = load_file(str(base / "model.safetensors"))
    cfg = ModelConfig.from_pretrained(base)
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        e = range(cfg.num_experts)
        t[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([t.pop(f"{p}.{j}.w1.weight"), t.pop(f"{p}.{j}.w3.weight")]) for j in e])
        t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{j}.w2.weight") for j in e])
    save_file(t, str(fused / "model.safetensors"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    want = generate(MonolithicModel.from_pretrained(base), prompts, params)
    assert generate(MonolithicModel.from_pretrained(sharded), prompts, params) == want
    assert generate(MonolithicModel.from_pretrained(fused), prompts, params) == want


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    t = load_file(str(src / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     "missing tensor 'model.layers.1.self_attn.k_proj.weight'"),
    (lambda t: t.update({"model.norm.weight": torch.ones(3)}),
     "'model.norm.weight' has shape [3], expected [64]"),
    (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.ones(3)}),
     "unexpected tensor 'model.layers.0.self_attn.extra.weight'"),
    (lambda t: t.update({"model.layers.0.block_sparse_moe.experts.9.w1.weight": torch.ones(3)}),
     "unexpected tensor 'model.layers.0.block_sparse_moe.experts.9.w1.weight'"),
])
def test_bad_checkpoints_raise_named_errors(mixtral_dir, tmp_path, edit, message):
    bad = _rewrite(mixtral_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MonolithicModel.from_pretrained(bad)


def test_missing_expert_tensor_is_named(mixtral_dir, tmp_path):
    bad = _rewrite(mixtral_dir, tmp_path / "bad",
                   lambda t: t.pop("model.layers.2.block_sparse_moe.experts.3.w2.weight"))
    cfg = ModelConfig.from_pretrained(bad)
    load_attention_weights(bad, cfg, torch.float32, "cpu")  # attention side does not care
    load_expert_weights(bad, cfg, [0, 1], torch.float32, "cpu")  # neither does another node
    with pytest.raises(CheckpointError, match="experts.3.w2.weight"):
        load_expert_weights(bad, cfg, [3], torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="expert ids"):
        load_expert_weights(bad, cfg, [7], torch.float32, "cpu")


def test_broken_index_and_no_weights(mixtral_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointIndex.open(empty)
    (empty / "model.safetensors.index.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(CheckpointError, match="unreadable index"):
        CheckpointIndex.open(empty)

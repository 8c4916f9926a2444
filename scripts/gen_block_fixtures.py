#!/usr/bin/env python3
"""Reference outputs of single MoE blocks, produced by Hugging Face `transformers` itself.

For each routing rule the project supports, this builds the family's real sparse-MoE block class
(`Qwen2MoeSparseMoeBlock`, `DeepseekV3MoE`, ...) from a tiny random config, runs it on a random
input and saves, in one safetensors file per case:

- the block's weights under the names a checkpoint on disk uses (`model.layers.0.mlp.*`), either
  per-expert (`experts.{e}.gate_proj.weight`, as `save_pretrained` writes) or fused 3-D
  (`experts.gate_up_proj`), so both loader paths are exercised;
- `x` [B, S, H], `out` [B, S, H] (the block's forward), `router_logits` [T, E], `topk_ids` [T, K],
  `topk_weights` [T, K], `lb_loss` [1] (transformers' `load_balancing_loss_func`);
- `expert_mask` [T, E]: a fixed 0/1 mask over (token, expert) with some tokens fully masked and some
  fully kept, `out_masked` / `out_masked_renorm`: the block's output when the routing weights of
  masked (token, expert) pairs are zeroed, without / with rescaling the kept weights to the original
  top-k sum (all-masked tokens get the shared expert only).

`cases.json` lists the cases with the config fields the Rust tests need.

Usage: python scripts/gen_block_fixtures.py [OUT_DIR]   (default: assets/fixtures/blocks)
Needs torch and transformers (tested with torch 2.15, transformers 5.24); CPU is enough.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

H, I = 16, 12
BATCH, SEQ = 2, 7


def cases():
    common = dict(hidden_size=H, moe_intermediate_size=I, intermediate_size=2 * I, hidden_act="silu",
                  num_attention_heads=4, num_key_value_heads=2)
    yield "qwen2_moe", Qwen2MoeSparseMoeBlock, Qwen2MoeConfig(
        **common, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, shared_expert_intermediate_size=20
    ), dict(family="qwen2_moe", norm_topk_prob=False, shared="qwen2", shared_intermediate=20, fused=False)
    yield "qwen2_moe_norm", Qwen2MoeSparseMoeBlock, Qwen2MoeConfig(
        **common, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, shared_expert_intermediate_size=8
    ), dict(family="qwen2_moe", norm_topk_prob=True, shared="qwen2", shared_intermediate=8, fused=True)
    yield "qwen3_moe", Qwen3MoeSparseMoeBlock, Qwen3MoeConfig(
        **common, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True
    ), dict(family="qwen3_moe", norm_topk_prob=True, fused=False)
    yield "olmoe", OlmoeSparseMoeBlock, OlmoeConfig(
        **{**common, "intermediate_size": I}, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False
    ), dict(family="olmoe", norm_topk_prob=False, fused=True)
    yield "mixtral", MixtralSparseMoeBlock, MixtralConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2,
    ), dict(family="mixtral", fused=False)
    yield "deepseek_v2_greedy", DeepseekV2Moe, DeepseekV2Config(
        **common, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, routed_scaling_factor=2.5,
        topk_method="greedy", n_group=1, topk_group=1,
    ), dict(family="deepseek_v2", topk_method="greedy", routed_scaling_factor=2.5, shared="deepseek",
            shared_intermediate=2 * I, n_group=1, topk_group=1, fused=False)
    yield "deepseek_v2_group", DeepseekV2Moe, DeepseekV2Config(
        **common, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, routed_scaling_factor=1.5,
        topk_method="group_limited_greedy", n_group=4, topk_group=2,
    ), dict(family="deepseek_v2", topk_method="group_limited_greedy", routed_scaling_factor=1.5,
            shared="deepseek", shared_intermediate=I, n_group=4, topk_group=2, fused=True)
    yield "deepseek_v3", DeepseekV3MoE, DeepseekV3Config(
        **common, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5,
        n_group=4, topk_group=2, norm_topk_prob=True,
    ), dict(family="deepseek_v3", norm_topk_prob=True, routed_scaling_factor=2.5, shared="deepseek",
            shared_intermediate=I, n_group=4, topk_group=2, fused=False)
    yield "deepseek_v3_nonorm", DeepseekV3MoE, DeepseekV3Config(
        **common, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=1.0,
        n_group=2, topk_group=1, norm_topk_prob=False,
    ), dict(family="deepseek_v3", norm_topk_prob=False, routed_scaling_factor=1.0, shared="deepseek",
            shared_intermediate=2 * I, n_group=2, topk_group=1, fused=True)


def randomise(block, std=0.3):
    """Random weights everywhere (transformers inits some to zero), incl. DeepSeek-V3's score bias."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * std)
        gate = block.gate
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.copy_(torch.randn_like(gate.e_score_correction_bias) * 0.1)


def disk_tensors(name, block, meta):
    """The block's weights named as in a checkpoint on disk."""
    prefix = "model.layers.0.block_sparse_moe." if meta["family"] == "mixtral" else "model.layers.0.mlp."
    sd = {k: v.detach().clone().contiguous() for k, v in block.state_dict().items()}
    out = {}
    gate_up, down = sd.pop("experts.gate_up_proj"), sd.pop("experts.down_proj")
    inter = down.shape[-1]
    if meta["fused"]:
        out[prefix + "experts.gate_up_proj"] = gate_up
        out[prefix + "experts.down_proj"] = down
    else:
        names = ("w1", "w3", "w2") if meta["family"] == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(gate_up.shape[0]):
            out[f"{prefix}experts.{e}.{names[0]}.weight"] = gate_up[e, :inter].contiguous()
            out[f"{prefix}experts.{e}.{names[1]}.weight"] = gate_up[e, inter:].contiguous()
            out[f"{prefix}experts.{e}.{names[2]}.weight"] = down[e].contiguous()
    for k, v in sd.items():
        out[prefix + k] = v
    return prefix, out


def shared_output(block, meta, xf):
    if meta.get("shared") == "qwen2":
        return torch.sigmoid(block.shared_expert_gate(xf)) * block.shared_expert(xf)
    if meta.get("shared") == "deepseek":
        return block.shared_experts(xf)
    return torch.zeros_like(xf)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join("assets", "fixtures", "blocks")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(20261124)
    index = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
    for name, cls, config, meta in cases():
        block = cls(config).eval().float()
        randomise(block)
        x = torch.randn(BATCH, SEQ, H)
        xf = x.view(-1, H)
        T = xf.shape[0]
        with torch.no_grad():
            out = block(x)
            router_logits, topk_weights, topk_ids = block.gate(xf)
            E = router_logits.shape[-1]
            K = topk_ids.shape[-1]
            lb = load_balancing_loss_func((router_logits,), E, K)

            # A fixed (token, expert) mask: token 0 keeps nothing, token 1 keeps everything.
            expert_mask = (torch.rand(T, E) > 0.5).float()
            expert_mask[0] = 0.0
            expert_mask[1] = 1.0
            slot_mask = expert_mask.gather(1, topk_ids)
            kept = topk_weights * slot_mask
            kept_sum = kept.sum(-1, keepdim=True)
            renorm = torch.where(kept_sum > 0, kept * topk_weights.sum(-1, keepdim=True) / kept_sum, kept)
            shared = shared_output(block, meta, xf)
            out_masked = block.experts(xf, topk_ids, kept) + shared
            out_masked_renorm = block.experts(xf, topk_ids, renorm) + shared

        prefix, tensors = disk_tensors(name, block, meta)
        tensors.update(
            x=x.contiguous(),
            out=out.contiguous(),
            router_logits=router_logits.float().contiguous(),
            topk_ids=topk_ids.to(torch.int64).contiguous(),
            topk_weights=topk_weights.float().contiguous(),
            lb_loss=lb.reshape(1).float(),
            expert_mask=expert_mask,
            out_masked=out_masked.view(BATCH, SEQ, H).contiguous(),
            out_masked_renorm=out_masked_renorm.view(BATCH, SEQ, H).contiguous(),
        )
        save_file(tensors, os.path.join(out_dir, f"{name}.safetensors"))
        inter = block.experts.down_proj.shape[-1]
        assert inter == I, f"{name}: expert intermediate size {inter} != {I}"
        case = dict(name=name, prefix=prefix, hidden_size=H, intermediate_size=inter, num_experts=E, top_k=K)
        case.update(meta)
        index["cases"].append(case)
        print(f"{name}: E={E} K={K} |out|max={out.abs().max():.3f}")
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(index, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tiny random DeepSeek-V2/V3 checkpoints, made and run by Hugging Face transformers.

Writes, like `gen_tiny_models.py` (same tokenizer, prompt and reference file layout), for each variant
an HF folder `assets/models/tiny-<variant>/` and `assets/fixtures/models/<variant>.safetensors`
(`input_ids`, `logits`, `hidden_states` [L + 1, 1, T, H], greedy `generated`):

- `deepseek_v2`: group-limited greedy routing (8 experts in 4 groups, best 2), plain `q_proj`, one
  dense first layer, 2 ungated shared experts, routed_scaling_factor 1.5.
- `deepseek_v2_yarn`: greedy routing, q-LoRA, YaRN RoPE (factor 4, mscale 1, mscale_all_dim 0.8, so the
  cos/sin factor and the softmax mscale are both != 1), attention biases.
- `deepseek_v3`: sigmoid + e_score_correction_bias (random, not zeros) in 4 groups of 4 (best 2),
  q-LoRA, interleaved RoPE, renormalised top-4 x 2.5; a multi-token-prediction layer's tensors
  (`model.layers.{L}.*`, `num_nextn_predict_layers: 1`) added to the file, as DeepSeek-V3 ships them.
- `deepseek_v3_fp8`: V3 with `rope_interleave: false` and every linear weight of attention, dense MLP
  and experts stored as float8_e4m3fn with `weight_scale_inv` block scales (16 x 16 blocks, so sizes
  that are not multiples leave partial blocks), `quantization_config` as DeepSeek-V3's. The reference
  runs transformers on the dequantised weights (`q.float() * scale_inv[block]`): what beam computes
  after dequantising on load.

Usage: .venv/bin/python scripts/gen_deepseek_models.py   (torch, transformers 5, tokenizers; CPU)
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_tiny_models import EOS, ROOT, VOCAB, randomize, save_reference, tokenizer  # noqa: E402

FP8_BLOCK = 16


def configs(eos_id):
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
        eos_token_id=eos_id, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
        intermediate_size=40, moe_intermediate_size=8, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6,
    )
    yield "deepseek_v2", DeepseekV2Config(
        **common, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        first_k_dense_replace=1, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    yield "deepseek_v2_yarn", DeepseekV2Config(
        **common, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        first_k_dense_replace=0, q_lora_rank=10, topk_method="greedy", routed_scaling_factor=1.0,
        attention_bias=True,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
        },
    )
    v3 = dict(
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    yield "deepseek_v3", DeepseekV3Config(**common, **v3, num_hidden_layers=3, q_lora_rank=10, rope_interleave=True)
    yield "deepseek_v3_fp8", DeepseekV3Config(
        **common, **v3, num_hidden_layers=2, q_lora_rank=None, rope_interleave=False
    )


def fp8_quantize(w):
    """DeepSeek-V3's block FP8: per 16 x 16 block, q = w / s in float8_e4m3fn, s = amax / 448."""
    rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    scale = torch.zeros(br, bc)
    for i in range(br):
        for j in range(bc):
            block = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            scale[i, j] = block.abs().max().clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def is_fp8_weight(name, t):
    if t.dim() != 2 or not name.endswith(".weight"):
        return False
    return ".self_attn." in name and "layernorm" not in name or (".mlp." in name and ".gate.weight" not in name)


def main():
    torch.manual_seed(20261201)
    tok = tokenizer()
    eos_id = tok.token_to_id(EOS)
    prompt = "And God said, Let there be light"
    ids = tok.encode(prompt).ids
    input_ids = torch.tensor([ids])
    for variant, config in configs(eos_id):
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config).eval().float()
        randomize(model)
        out_dir = os.path.join(ROOT, "assets", "models", f"tiny-{variant}")
        os.makedirs(out_dir, exist_ok=True)
        for f in os.listdir(out_dir):
            os.remove(os.path.join(out_dir, f))
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        path = os.path.join(out_dir, "model.safetensors")
        tensors = load_file(path)
        config_path = os.path.join(out_dir, "config.json")
        with open(config_path) as f:
            config_json = json.load(f)
        if variant == "deepseek_v3":
            layer = config.num_hidden_layers
            h = config.hidden_size
            mtp = {
                "enorm.weight": [h], "hnorm.weight": [h], "eh_proj.weight": [h, 2 * h],
                "shared_head.norm.weight": [h], "shared_head.head.weight": [VOCAB, h],
                "self_attn.kv_a_proj_with_mqa.weight": [16, h], "mlp.experts.0.gate_proj.weight": [8, h],
            }
            for name, shape in mtp.items():
                tensors[f"model.layers.{layer}.{name}"] = torch.randn(shape)
            config_json["num_nextn_predict_layers"] = 1
        if variant == "deepseek_v3_fp8":
            state = {}
            for name in list(tensors):
                if is_fp8_weight(name, tensors[name]):
                    q, scale, dequantized = fp8_quantize(tensors[name])
                    tensors[name] = q
                    tensors[name + "_scale_inv"] = scale.contiguous()
                    state[name] = dequantized
            # In memory, transformers holds each layer's experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I].
            for layer in range(config.num_hidden_layers):
                prefix = f"model.layers.{layer}.mlp.experts."
                experts = [k for k in state if k.startswith(prefix)]
                if not experts:
                    continue
                e = range(config.n_routed_experts)
                state[prefix + "gate_up_proj"] = torch.stack(
                    [torch.cat([state[f"{prefix}{i}.gate_proj.weight"], state[f"{prefix}{i}.up_proj.weight"]]) for i in e]
                )
                state[prefix + "down_proj"] = torch.stack([state[f"{prefix}{i}.down_proj.weight"] for i in e])
                for k in experts:
                    del state[k]
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected, unexpected
            config_json["quantization_config"] = {
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            }
            print(variant, "fp8 weights", len(state))
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
        with open(config_path, "w") as f:
            json.dump(config_json, f, indent=2)
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True)
            generated = model.generate(
                input_ids, max_new_tokens=12, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id
            )[0, len(ids):]
        save_reference(variant, input_ids, out, generated)
        print(variant, "files", sorted(os.listdir(out_dir)), "generated", generated.tolist())
    with open(os.path.join(ROOT, "assets", "fixtures", "models", "VERSIONS-deepseek.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "prompt": prompt}, f)


if __name__ == "__main__":
    main()

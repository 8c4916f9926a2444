#!/usr/bin/env python3
"""Tiny random MoE checkpoints of every supported family, made and run by Hugging Face transformers.

Writes, for each family, an HF checkpoint folder `assets/models/tiny-<family>/` (config.json,
safetensors, tokenizer.json) and a reference file `assets/fixtures/models/<family>.safetensors` with:
- `input_ids` [1, T] (int64), `logits` [1, T, V], `hidden_states` [L + 1, 1, T, H] (transformers'
  `output_hidden_states`: embeddings, then each layer, the last one after the final norm);
- `generated` [N] (int64): greedy continuation of `input_ids`, new tokens only, stopping on EOS.

Variety on purpose: Qwen2-MoE has a dense layer (`mlp_only_layers`) and a gated shared expert,
Qwen3-MoE decoupled head_dim + per-head q/k norm, OLMoE whole-projection q/k norm + clip_qkv and fused
expert tensors on disk, Mixtral a sliding window shorter than the prompt and sharded safetensors.

Usage: python scripts/gen_tiny_models.py   (needs torch, transformers, tokenizers; CPU is enough)
"""
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VOCAB = 300
EOS = "<|endoftext|>"
TEXT = """In the beginning God created the heaven and the earth. And the earth was without form, and void;
and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.
And God said, Let there be light: and there was light. And God saw the light, that it was good:
and God divided the light from the darkness. Mixture of experts models route each token to a few experts.
BEAM switches off the experts a token does not need, so easy tokens run fewer experts."""


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return tok


def configs(eos_id):
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, eos_token_id=eos_id, bos_token_id=None, pad_token_id=None, rope_theta=10000.0,
    )
    yield "qwen2_moe", Qwen2MoeConfig(
        **common, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, shared_expert_intermediate_size=24, norm_topk_prob=False, mlp_only_layers=[1],
        decoder_sparse_step=1, tie_word_embeddings=False, qkv_bias=True,
    ), {}
    yield "qwen3_moe", Qwen3MoeConfig(
        **common, num_hidden_layers=2, head_dim=12, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True,
    ), {}
    yield "olmoe", OlmoeConfig(
        **common, num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=False, clip_qkv=0.6, tie_word_embeddings=False,
    ), dict(save_original_format=False)
    yield "mixtral", MixtralConfig(
        **common, num_hidden_layers=2, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
        sliding_window=5, tie_word_embeddings=False,
    ), dict(max_shard_size="40KB")


def randomize(model):
    """Random weights (norms around 1, not all ones, so a missed norm shows); DeepSeek-V3's correction
    bias buffer random too (zeros would hide a bias that is not read)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))


def save_reference(name, input_ids, out, generated):
    """`assets/fixtures/models/<name>.safetensors`: input ids, logits, hidden states, greedy ids."""
    ref_dir = os.path.join(ROOT, "assets", "fixtures", "models")
    os.makedirs(ref_dir, exist_ok=True)
    save_file(
        {
            "input_ids": input_ids.to(torch.int64).contiguous(),
            "logits": out.logits.float().contiguous(),
            "hidden_states": torch.stack(out.hidden_states).float().contiguous(),
            "generated": generated.to(torch.int64).contiguous(),
        },
        os.path.join(ref_dir, f"{name}.safetensors"),
    )


def main():
    torch.manual_seed(20261124)
    tok = tokenizer()
    eos_id = tok.token_to_id(EOS)
    prompt = "And God said, Let there be light"
    ids = tok.encode(prompt).ids
    assert len(ids) > 5, ids
    input_ids = torch.tensor([ids])
    for family, config, save_kwargs in configs(eos_id):
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config).eval().float()
        randomize(model)
        out_dir = os.path.join(ROOT, "assets", "models", f"tiny-{family}")
        os.makedirs(out_dir, exist_ok=True)
        for f in os.listdir(out_dir):
            os.remove(os.path.join(out_dir, f))
        model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True)
            generated = model.generate(
                input_ids, max_new_tokens=12, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id
            )[0, len(ids):]
        save_reference(family, input_ids, out, generated)
        print(family, "files", sorted(os.listdir(out_dir)), "generated", generated.tolist())
    with open(os.path.join(ROOT, "assets", "fixtures", "models", "VERSIONS.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "prompt": prompt}, f)


if __name__ == "__main__":
    main()

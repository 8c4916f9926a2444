#!/usr/bin/env python3
"""Train the small top-K Qwen3-MoE base model that beam's demo, training and evaluation use.

Reads the corpus and tokenizer made by scripts/prepare_corpus.py and writes the HF checkpoint folder
assets/models/kjv-moe/ (config.json, model.safetensors, generation_config.json; tokenizer.json is
already there) plus assets/fixtures/models/kjv-moe.safetensors (transformers' logits on a validation
snippet, so the Rust loader is checked on this very model).

The model: Qwen3-MoE, 4 layers, hidden 128, 4 heads (2 KV heads, head_dim 32), 16 experts of
intermediate size 64, top-4 with normalised weights, vocabulary 1024 (byte-level BPE), tied embeddings.
Training: next-token cross-entropy + 0.01 x transformers' load-balancing loss, AdamW, 256-token windows,
batch 16, cosine learning rate. CPU is enough (about 25 minutes on 2 cores).

`--variant fine` trains the fine-grained sibling assets/models/kjv-moe-fine/ instead: the same model but
64 experts of intermediate size 32, top-8 (OLMoE's / Qwen3-MoE's granularity: the same active expert
compute per token, 8 x 32 = 4 x 64 intermediate units), stored in bf16 (the validation figures in
training.json and the reference logits are those of the bf16-rounded weights).

Usage: python3 scripts/train_base_model.py [--steps 1600] [--variant coarse|fine]
(needs torch, transformers, tokenizers, safetensors)
"""
import argparse
import gzip
import json
import math
import os
import shutil
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 256
# variant -> (folder name, experts, expert intermediate size, top-k, stored dtype)
VARIANTS = {
    "coarse": ("kjv-moe", 16, 64, 4, torch.float32),
    "fine": ("kjv-moe-fine", 64, 32, 8, torch.bfloat16),
}


def tokens(tok, split):
    with gzip.open(os.path.join(ROOT, "assets", "corpus", f"kjv-{split}.txt.gz"), "rt", encoding="utf-8") as f:
        return torch.tensor(tok.encode(f.read()).ids, dtype=torch.long)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="coarse")
    ap.add_argument("--reference-only", action="store_true",
                    help="skip training: re-evaluate the saved model and rewrite its reference logits")
    args = ap.parse_args()
    name, experts, expert_size, top_k, stored = VARIANTS[args.variant]
    model_dir = os.path.join(ROOT, "assets", "models", name)
    # The tokenizer is the corpus's (scripts/prepare_corpus.py), shared by both variants.
    tok_path = os.path.join(ROOT, "assets", "models", "kjv-moe", "tokenizer.json")
    torch.manual_seed(20261124)
    torch.set_num_threads(args.threads)

    tok = Tokenizer.from_file(tok_path)
    eos = tok.token_to_id("<|endoftext|>")
    train, valid = tokens(tok, "train"), tokens(tok, "valid")
    print(f"train tokens {len(train)}, validation tokens {len(valid)}", flush=True)

    config = Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=expert_size,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        router_aux_loss_coef=0.01, output_router_logits=True, eos_token_id=eos, bos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    if args.variant == "fine":
        # 64 small experts: one grouped matmul instead of a Python loop over experts (1.6x faster
        # on 2 cores; the same computation).
        config._experts_implementation = "grouped_mm"
    model = Qwen3MoeForCausalLM(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters())}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    # Fixed validation windows: non-overlapping, the whole split.
    n_val = (len(valid) - 1) // SEQ
    val_x = valid[: n_val * SEQ].view(n_val, SEQ)
    val_y = valid[1 : n_val * SEQ + 1].view(n_val, SEQ)

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for i in range(0, n_val, 32):
            out = model(input_ids=val_x[i : i + 32])
            logits = out.logits.float()
            y = val_y[i : i + 32]
            loss_sum += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
        model.train()
        return loss_sum / count, correct / count

    if not args.reference_only:
        start = time.time()
        gen = torch.Generator().manual_seed(1)
        model.train()
        for step in range(args.steps):
            idx = torch.randint(0, len(train) - SEQ - 1, (args.batch,), generator=gen)
            x = torch.stack([train[i : i + SEQ] for i in idx])
            y = torch.stack([train[i + 1 : i + SEQ + 1] for i in idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            out = model(input_ids=x)
            # transformers shifts labels itself; pass already-shifted targets through the plain CE instead.
            ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
            loss = ce + config.router_aux_loss_coef * out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step} ce {ce.item():.4f} aux {out.aux_loss.item():.4f} lr {lr_at(step):.2e} "
                      f"{time.time() - start:.0f}s", flush=True)
            if (step + 1) % 400 == 0 or step == args.steps - 1:
                vl, va = evaluate()
                print(f"validation: loss {vl:.4f} perplexity {math.exp(vl):.2f} next-token accuracy {va:.4f}", flush=True)

        model.config.output_router_logits = False
        os.makedirs(model_dir, exist_ok=True)
        model.to(stored).save_pretrained(model_dir, safe_serialization=True)
        if name != "kjv-moe":
            shutil.copy(tok_path, os.path.join(model_dir, "tokenizer.json"))
        trained = {"steps": args.steps, "train_seconds": round(time.time() - start)}
    else:
        with open(os.path.join(model_dir, "training.json")) as f:
            old = json.load(f)
        trained = {"steps": old["steps"], "train_seconds": old["train_seconds"]}

    # Every figure below is the shipped model's: read back from the files in f32, as a user
    # (and the Rust loader) reads it; buffers such as RoPE's frequencies are recomputed in f32.
    model = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    vl, va = evaluate()
    with open(os.path.join(model_dir, "training.json"), "w") as f:
        json.dump({
            "script": "scripts/train_base_model.py", "variant": args.variant, "steps": trained["steps"],
            "batch": args.batch, "seq_len": SEQ, "lr": args.lr, "validation_loss": vl,
            "validation_perplexity": math.exp(vl), "validation_next_token_accuracy": va,
            "train_seconds": trained["train_seconds"],
        }, f, indent=2)

    # Reference logits of transformers on a validation snippet, for the Rust loader test.
    model.eval()
    ids = val_x[0:1, :64]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    os.makedirs(os.path.join(ROOT, "assets", "fixtures", "models"), exist_ok=True)
    save_file({"input_ids": ids.contiguous(), "logits": out.logits.float().contiguous()},
              os.path.join(ROOT, "assets", "fixtures", "models", f"{name}.safetensors"))
    print(f"saved to {model_dir}: validation loss {vl:.4f}, accuracy {va:.4f}", flush=True)


if __name__ == "__main__":
    main()

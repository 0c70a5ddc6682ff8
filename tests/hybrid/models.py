"""Tiny ``transformers`` decoders and a training step shared by the hybrid-parallel tests.

Sizes are picked so that every layout meets an uneven shard: the vocabulary (50 rows) is
uneven over 4 data-parallel ranks, and ``intermediate_size=18`` leaves 9 rows per
tensor-parallel rank at tp=2, split 5 / 4 by FSDP2 over dp=2 (an uneven ``_StridedShard``).
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 50
GLOBAL_BATCH = 4  # sequences per step, split evenly over the dp ranks
SEQ = 8


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=18,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def pipeline_llama(seed: int = 0) -> nn.Module:
    """Four decoder layers (two per stage at pp=2), heads and sizes divisible by tp=2, untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (mean over tokens), as ``LlamaForCausalLM`` computes it."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=4, n_inner=24, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with two groups of different settings, built on the unsharded model."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "lr": 0.02, "weight_decay": 0.1, "betas": (0.8, 0.95)},
            {"params": rest, "lr": 0.01, "weight_decay": 0.0},
        ]
    )


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)


def train_steps(model, optimizer, steps: range, *, dp_rank: int = 0, dp_size: int = 1, dp_group=None) -> list[float]:
    """One optimizer step per global batch; each dp rank takes its equal slice, so the
    mean of the dp ranks' losses is the single-process loss of the whole batch."""
    import torch.distributed as dist

    per = GLOBAL_BATCH // dp_size
    losses = []
    for step in steps:
        ids = global_batch(step)[dp_rank * per : (dp_rank + 1) * per]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(loss, group=dp_group)
        losses.append(loss.item() / dp_size)
    return losses

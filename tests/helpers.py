"""Small models and comparisons shared by the tests (no downloads: models are built from configs)."""

from __future__ import annotations

import torch
from torch import nn


class MLPWithBuffers(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)
        self.register_buffer("scale", torch.randn(4))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) * self.scale


def tiny_gpt2(dtype=torch.float32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Fill every saved tensor with fresh values, so a no-op load is detected.

    Only the state dict (parameters and persistent buffers): non-persistent buffers such as
    rotary ``inv_freq`` are derived from the config and never saved.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
            elif t.dtype == torch.int64:
                t.fill_(int(torch.randint(0, 100, (), generator=gen)))
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


class TwoLinears(nn.Module):
    """Owns both ``linear`` and ``module.linear``: a DDP file of it has ``module.linear`` AND
    ``module.module.linear``, so stripping ``module.`` per key would swap the two."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.module = nn.Module()
        self.module.linear = nn.Linear(4, 4)


def two_linears(seed: int = 1) -> nn.Module:
    return randomize(TwoLinears(), seed=seed)


def averaged_linear(seed: int = 1) -> nn.Module:
    """``torch.optim.swa_utils.AveragedModel``: its own weights live under ``module.``."""
    from torch.optim.swa_utils import AveragedModel

    return randomize(AveragedModel(nn.Linear(4, 4)), seed=seed)

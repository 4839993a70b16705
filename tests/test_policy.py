"""PolicyHead: streamed entropy and log-probs against the textbook definitions in float64."""

import math

import pytest
import torch
from torch import nn

from internal_policy.policy import PolicyHead


def plain_entropy(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).nan_to_num().sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_streamed_entropy_equals_textbook(temperature, bias):
    torch.manual_seed(0)
    unembed = nn.Linear(16, 1000, bias=bias)
    nn.init.normal_(unembed.weight, std=2.0)  # logits with std ~8 nats: peaked policies and huge logits
    states = torch.randn(37, 16) * torch.logspace(-2, 1, 37)[:, None]  # from almost uniform to one-hot
    head = PolicyHead(unembed, temperature=temperature, token_chunk=8, vocab_block=128)  # many blocks and chunks
    expected = plain_entropy(unembed(states).detach() / temperature)
    got = head.entropy(states)
    assert got.dtype == torch.float32 and got.shape == (37,)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    assert expected.min() < 0.05 and expected.max() > 0.9 * math.log(1000)  # the range is really covered


def test_final_norm_mode_reads_lnf_of_the_state():
    torch.manual_seed(0)
    unembed, norm = nn.Linear(8, 50, bias=False), nn.LayerNorm(8)
    states = torch.randn(5, 8) * 10
    head = PolicyHead(unembed, norm, norm_mode="final")
    assert torch.allclose(head.entropy(states).double(), plain_entropy(unembed(norm(states)).detach()), atol=1e-5)


def test_log_probs_and_gradient():
    torch.manual_seed(0)
    unembed = nn.Linear(8, 50)
    states = torch.randn(6, 8, requires_grad=True)
    targets = torch.randint(0, 50, (6,))
    head = PolicyHead(unembed, temperature=2.0)
    got = head.log_probs(states, targets)
    expected = torch.log_softmax(unembed(states).double() / 2.0, -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    got.sum().backward()
    assert states.grad is not None and unembed.weight.grad.abs().sum() > 0


def test_weight_cache_follows_in_place_updates():
    unembed = nn.Linear(4, 10, bias=False)
    head = PolicyHead(unembed)
    states = torch.randn(3, 4)
    before = head.entropy(states)
    with torch.no_grad():
        unembed.weight.mul_(5.0)
    assert not torch.allclose(before, head.entropy(states))

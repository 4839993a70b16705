"""PolicyHead: streamed entropy and log-probs against the textbook definitions in float64."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from internal_policy.lens import policy
from internal_policy.lens.policy import PolicyHead


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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_mode_equals_textbook_entropy_of_bf16_logits(temperature, bias, monkeypatch):
    """Fast mode (compiled block reductions) computes exactly the entropy of the bf16 matmul's logits, the same as
    its eager form, and stays close to the float32 entropy."""
    import internal_policy.lens.policy as policy

    torch.manual_seed(1)
    unembed = nn.Linear(16, 1000, bias=bias)
    nn.init.normal_(unembed.weight, std=2.0)
    states = torch.randn(37, 16) * torch.logspace(-2, 1, 37)[:, None]
    low = states.bfloat16() @ unembed.weight.detach().bfloat16().T  # the fast path's logits, rounded to bf16
    logits = low.double() + (unembed.bias.detach().double() if bias else 0.0)
    expected = plain_entropy(logits / temperature)
    fast = PolicyHead(unembed, temperature=temperature, fast=True, token_chunk=8, vocab_block=128)
    compiled = fast.entropy(states)
    monkeypatch.setitem(policy._COMPILED, "fold_block", policy.fold_block)  # the eager form
    eager = PolicyHead(unembed, temperature=temperature, fast=True, token_chunk=8, vocab_block=128).entropy(states)
    assert torch.allclose(compiled.double(), expected, atol=1e-4)
    assert torch.allclose(compiled, eager, atol=1e-5)
    exact = plain_entropy(unembed(states).detach() / temperature)
    assert 0 < (compiled.double() - exact).abs().max() < 0.5  # bf16 logits: close, but not the float32 numbers


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab_block", [4, 32, 128, 768])
def test_predictions_equal_a_full_softmax_with_ties_broken_by_the_lower_id(fast, bias, vocab_block):
    """Top-k ids and probabilities, and the target's probability and rank, against the textbook on the logits the
    head computes (float32, or the bf16 matmul's in fast mode), over many vocabulary blocks and chunks: blocks of 768
    columns are searched by groups of 128, the last one of 232 and blocks of 128 or 32 column by column, blocks of 4
    hold fewer tokens than k, and 32 or more blocks are merged before the chunk ends. Ten identical rows of U make
    exact ties (across groups and blocks), which must list (and rank) the lower id first."""
    assert 768 % policy._GROUP == 0 and 768 // policy._GROUP > 5  # blocks of 768 take the grouped search
    torch.manual_seed(0)
    unembed = nn.Linear(16, 1000, bias=bias)
    nn.init.normal_(unembed.weight, std=2.0)
    with torch.no_grad():
        unembed.weight[500:510] = unembed.weight[3]
        if bias:
            unembed.bias[500:510] = unembed.bias[3]
    states = torch.randn(37, 16) * torch.logspace(-2, 1, 37)[:, None]
    targets = torch.randint(0, 1000, (37,))
    targets[:5] = 505  # ties with 3 and 500..509: six of them have a lower id
    head = PolicyHead(unembed, temperature=0.7, token_chunk=8, vocab_block=vocab_block, fast=fast)
    got = head.predictions(states, targets, 5)
    if fast:
        raw = (states.bfloat16() @ unembed.weight.detach().bfloat16().T).double()
    else:
        raw = (states.double() @ unembed.weight.detach().double().T)
    logits = (raw + (unembed.bias.detach().double() if bias else 0.0)) / 0.7
    p = torch.softmax(logits, -1)
    for row in range(37):
        order = torch.sort(-logits[row], stable=True).indices  # by logit, equal logits by id
        assert got.top_ids[row].tolist() == order[:5].tolist()
        rank = int((order == targets[row]).nonzero()) + 1
        if fast:  # logits within one bf16 step of the target's count as ties (docs/definitions.md)
            band = ((logits[row] - logits[row, targets[row]]).abs() <= logits[row, targets[row]].abs() * 2 ** -7 / 0.7 + 1e-6)
            assert abs(int(got.token_rank[row]) - rank) <= int(band.sum())
        else:
            assert int(got.token_rank[row]) == rank
    assert torch.allclose(got.top_probs.double(), p.gather(1, got.top_ids), atol=2e-5)
    assert torch.allclose(got.token_prob.double(), p.gather(1, targets[:, None]).squeeze(1), atol=1e-6)
    assert torch.allclose(got.entropy.double(), plain_entropy(logits), atol=2e-4)
    assert len(set(got.token_rank.tolist())) > 20  # the ranks spread: the check can fail
    # a state along U's row 3: the eleven tied rows are the most probable, listed and ranked by id
    tied = head.predictions(unembed.weight.detach()[3:4] * 4.0, torch.tensor([505]), 5)
    assert tied.top_ids[0].tolist() == [3, 500, 501, 502, 503] and int(tied.token_rank[0]) == 7


def test_order_keys_sort_by_value_then_by_the_lower_id():
    """The int64 keys behind every top-k order float32 values as numbers (negative, zero of either sign, infinite,
    subnormal) and equal values by id, compared with Python's own sort of (value, id) pairs."""
    values = torch.tensor([1.5, -0.0, 0.0, -2.0, float("-inf"), float("inf"), 1e-45, -1e-45, 1.5, -2.0, 3.0e38, 0.0])
    ids = torch.tensor([7, 3, 2, 9, 0, 11, 4, 5, 1, 8, 6, 10])
    keys = policy._order_keys(values, ids)
    by_key = ids[torch.argsort(keys, descending=True)].tolist()
    expected = [i for _, i in sorted(zip(values.tolist(), ids.tolist()), key=lambda pair: (-pair[0], pair[1]))]
    assert by_key == expected


def test_fast_predictions_without_a_compiler_equal_the_compiled_ones(monkeypatch):
    """Where torch.compile is impossible fast mode's fold runs eagerly (the same function, which then takes the eager
    branches: the tie test on the groups' maxima, one count per row): the same predictions as compiled."""
    torch.manual_seed(2)
    unembed = nn.Linear(16, 1000)
    nn.init.normal_(unembed.weight, std=2.0)
    with torch.no_grad():
        unembed.weight[500:510], unembed.bias[500:510] = unembed.weight[3], unembed.bias[3]
    states, targets = torch.randn(37, 16) * 3, torch.randint(0, 1000, (37,))
    states[0] = unembed.weight.detach()[3] * 4.0
    compiled = PolicyHead(unembed, fast=True, token_chunk=8, vocab_block=768).predictions(states, targets, 5)
    monkeypatch.setitem(policy._COMPILED, "fold_block", policy.fold_block)
    eager = PolicyHead(unembed, fast=True, token_chunk=8, vocab_block=768).predictions(states, targets, 5)
    for name in ("top_ids", "top_probs", "token_prob", "token_rank"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    assert torch.allclose(compiled.entropy, eager.entropy, atol=1e-5)


def test_predictions_refuse_targets_that_do_not_match_the_states():
    """One token id per state, inside the vocabulary: a short list or a padding id of -1 is an error, not rows
    silently dropped or token V - 1 read instead."""
    head = PolicyHead(nn.Linear(8, 50, bias=False), token_chunk=3)
    with pytest.raises(ValueError, match="one token id per state"):
        head.predictions(torch.randn(10, 8), torch.randint(0, 50, (9,)), 5)
    with pytest.raises(ValueError, match=r"token ids in 0\.\.49, got -1"):
        head.predictions(torch.randn(10, 8), torch.full((10,), -1), 5)
    with pytest.raises(ValueError, match="got 0..50"):
        head.predictions(torch.randn(2, 8), torch.tensor([0, 50]), 5)


def test_the_rank_band_holds_the_roundings_of_a_large_bias_and_of_tiny_states():
    """Two tokens with identical rows and biases tie exactly: the sampled one with the higher id has rank 2, even when
    a bias far larger than x.u rounds the matmul's and the dot product's logits differently. And a state so small that
    |x|^2 underflows float32 still gets the float64 rank."""
    unembed = nn.Linear(5, 4)
    with torch.no_grad():
        unembed.weight.zero_()
        unembed.bias.fill_(-5.0)
        unembed.weight[1] = unembed.weight[2] = torch.tensor([1.0, -1.0, 3.0, 2**-15 + 2**-25, -3.0])
        unembed.bias[1] = unembed.bias[2] = 1000.0
    tied = PolicyHead(unembed).predictions(torch.ones(8, 5), torch.full((8,), 2), 2)
    assert tied.token_rank.tolist() == [2] * 8 and tied.top_ids[0].tolist() == [1, 2]

    torch.manual_seed(3)
    unembed = nn.Linear(16, 1000, bias=False)
    nn.init.normal_(unembed.weight, std=2.0)
    states, targets = torch.randn(8, 16) * 1e-25, torch.randint(0, 1000, (8,))
    got = PolicyHead(unembed).predictions(states, targets, 5)
    logits = states.double() @ unembed.weight.detach().double().T
    for row in range(8):
        order = torch.sort(-logits[row], stable=True).indices
        assert int(got.token_rank[row]) == int((order == targets[row]).nonzero()) + 1


def test_predictions_of_no_states_are_empty_with_min_k_and_vocabulary_columns():
    head = PolicyHead(nn.Linear(8, 10))
    for k, columns in ((3, 3), (30, 10)):
        empty = head.predictions(torch.empty(0, 8), torch.empty(0, dtype=torch.long), k)
        assert empty.top_ids.shape == (0, columns) and empty.top_probs.shape == (0, columns) and len(empty.entropy) == 0


def test_a_head_refuses_settings_that_define_no_policy_and_targets_that_are_not_ids():
    """A temperature of 0, below 0 or infinite, and blocks of no rows or columns, are refused when the head is built
    (naming the parameter), not met later as a ZeroDivisionError or an endless loop; float or bool targets are refused
    rather than read as ids."""
    unembed = nn.Linear(8, 50, bias=False)
    for temperature in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="temperature must be a finite number above 0"):
            PolicyHead(unembed, temperature=temperature)
    for softcap in (0.0, -30.0, math.inf):  # 0 was no cap in logits() but a uniform policy in entropy()
        with pytest.raises(ValueError, match="logit_softcap must be None"):
            PolicyHead(unembed, logit_softcap=softcap)
    with pytest.raises(ValueError, match="logit_scale must be a finite number other than 0"):
        PolicyHead(unembed, logit_scale=math.nan)
    assert PolicyHead(unembed, temperature=np.float32(0.5)).temperature == 0.5  # numpy numbers are numbers
    for name in ("token_chunk", "vocab_block"):
        for value in (0, -3, 2.5):
            with pytest.raises(ValueError, match=f"{name} must be a whole number of at least 1"):
                PolicyHead(unembed, **{name: value})
    head = PolicyHead(unembed)
    for top_k in (0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="top_k must be a whole number of at least 1"):
            head.predictions(torch.randn(2, 8), torch.tensor([1, 2]), top_k)
    for targets in (torch.tensor([1.0, 2.0]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="targets must be integer token ids"):
            head.predictions(torch.randn(2, 8), targets, 3)


def test_a_state_with_nan_or_inf_has_no_predictions_and_leaves_the_others_alone():
    """A NaN or inf in a state gives no policy: NaN entropy and probabilities, ids -1 and rank 0 (never rank 1, which
    a count of logits above NaN would give); the other rows of its chunk are the textbook's."""
    torch.manual_seed(3)
    unembed = nn.Linear(8, 300, bias=False)
    nn.init.normal_(unembed.weight, std=2.0)
    states, targets = torch.randn(6, 8), torch.randint(0, 300, (6,))
    states[1, 2], states[4, 0] = math.nan, math.inf
    got = PolicyHead(unembed, token_chunk=4, vocab_block=128).predictions(states, targets, 3)
    bad = torch.tensor([False, True, False, False, True, False])
    assert got.token_rank[bad].tolist() == [0, 0] and (got.top_ids[bad] == -1).all()
    assert got.entropy[bad].isnan().all() and got.top_probs[bad].isnan().all() and got.token_prob[bad].isnan().all()
    logits = states[~bad].double() @ unembed.weight.detach().double().T
    order = torch.sort(-logits, dim=-1, stable=True).indices
    assert got.top_ids[~bad].tolist() == order[:, :3].tolist()
    ranks = [int((order[i] == t).nonzero()) + 1 for i, t in enumerate(targets[~bad])]
    assert got.token_rank[~bad].tolist() == ranks
    assert torch.allclose(got.entropy[~bad].double(), plain_entropy(logits), atol=1e-4)


def test_fast_mode_compiles_its_fold_once_for_every_temperature():
    """The scale reaches the compiled fold as a tensor: a notebook that tries ten temperatures compiles nothing after
    the first (a float would be compiled in, and dynamo falls back to the slow eager fold after 8 recompiles)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(4)
    unembed = nn.Linear(16, 1000)
    states, targets = torch.randn(37, 16), torch.randint(0, 1000, (37,))
    PolicyHead(unembed, fast=True, token_chunk=8, vocab_block=768).predictions(states, targets, 5)
    compiled = counters["stats"]["unique_graphs"]
    for temperature in (0.3, 0.7, 1.3, 2.0):
        head = PolicyHead(unembed, temperature=temperature, fast=True, token_chunk=8, vocab_block=768)
        got = head.predictions(states, targets, 5)
        logits = (states.bfloat16() @ unembed.weight.detach().bfloat16().T).double() + unembed.bias.detach().double()
        assert torch.allclose(got.entropy.double(), plain_entropy(logits / temperature), atol=2e-4)
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.parametrize("fast", [False, True])
def test_a_soft_capped_policy_ranks_tokens_by_their_capped_logits_not_a_band_taken_before_the_cap(fast):
    """The rounding within which a logit counts as equal to the sampled one is of the logit before the soft cap; after
    it the same interval is narrower. Ten tokens whose logit before a cap of 3 is 6 (capped 2.89) and the sampled one
    at 40 (capped 3.00, the most probable): its rank is 1, in both modes. Taking the raw bf16 step (0.31) as the band
    after the cap made all ten tie with it, and the most probable token ranked 11th (in exact mode too, for a state
    of large norm: the same head with d = 4096 and |x| = 5000 below)."""
    unembed = nn.Linear(1, 11, bias=False)
    with torch.no_grad():
        unembed.weight[:10, 0], unembed.weight[10, 0] = 6.0, 40.0
    got = PolicyHead(unembed, logit_softcap=3.0, fast=fast).predictions(torch.ones(1, 1), torch.tensor([10]), 3)
    assert got.top_ids[0].tolist() == [10, 0, 1] and int(got.token_rank[0]) == 1
    wide = nn.Linear(4096, 11, bias=False)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:10, 0], wide.weight[10, 0], wide.weight[10, 1] = 80 / 5000, 90 / 5000, 3.0
    state = torch.zeros(1, 4096)
    state[0, 0] = 5000.0  # raw logits 80 (capped 29.71) and 90 (capped 29.85): 0.14 apart, far beyond any rounding
    got = PolicyHead(wide, logit_softcap=30.0, fast=fast).predictions(state, torch.tensor([10]), 3)
    assert got.top_ids[0, 0] == 10 and int(got.token_rank[0]) == 1

"""Every supported architecture (tiny random configs): the bridge hooks read the states of the definitions, the two
state readers agree, and the engine matches an independent float64 implementation (tests/reference.py)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import internal_policy as ip
from conftest import ROWS
from internal_policy.lens.states import LNF, BridgeStates, residual_states
from internal_policy.models import load_model
from reference import capture, layout, reference_summary, reference_token_table
from tiny_models import ALL_ARCHITECTURES, save_tiny_model


BLOCK_LAYOUT = {"gemma2": "pre+post-norm", "gemma3": "pre+post-norm", "olmo2": "post-norm", "gpt_neox": "parallel"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> folder of its tiny model, built on first use."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return made[arch]

    return get


def reference_model(folder):
    """The plain Hugging Face model, with the eager attention kernel (Gemma-2 soft-caps attention scores) and the
    eager loop over experts (the grouped kernel of MoE models takes no float64)."""
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                experts_implementation="eager").eval()


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_bridge_hooks_equal_the_models_own_forward(arch, tiny):
    """Each hook the engine reads holds the state of docs/definitions.md §1, as the model's own modules compute it."""
    loaded = load_model(str(tiny(arch)), device="cpu")
    hf = reference_model(tiny(arch))
    parts = layout(hf)
    names = BridgeStates.block_hooks(loaded.block_layout)
    ids = torch.tensor([loaded.tokenizer("What is 12 + 7? hello world", add_special_tokens=False)["input_ids"]])
    captured, handles = {}, []

    def keep(name, pick=lambda inputs, output: output):
        return lambda module, inputs, output: captured.__setitem__(name, pick(inputs, output[0] if isinstance(output, tuple) else output))

    for i, block in enumerate(parts["layers"]):
        handles += [
            block.register_forward_pre_hook(lambda m, a, k, i=i: captured.__setitem__(
                f"blocks.{i}.{names['resid_pre']}", a[0] if a else k["hidden_states"]), with_kwargs=True),
            block.register_forward_hook(keep(f"blocks.{i}.{names['resid_post']}")),
        ]
        for state in ("attn_in", "attn_out", "ffn_stream", "ffn_in", "ffn_out"):
            name = f"blocks.{i}.{names[state]}"
            handles.append(capture(block, parts[state], lambda x, name=name: captured.setdefault(name, x)))
    handles.append(parts["norm"].register_forward_hook(keep("ln_final.hook_out")))
    with torch.no_grad():
        hf(ids)
        _, cache = loaded.bridge.run_with_cache(ids)
    for handle in handles:
        handle.remove()
    assert len(captured) == len({f"blocks.{i}.{h}" for i in range(len(parts["layers"])) for h in names.values()}) + 1
    for name, expected in captured.items():
        # float32 kernels sum in another order (the bridge runs sdpa, the reference eager attention): 4 layers of a
        # model with large activations (GPT-2, 17 at layer 4) differ by up to 1.1e-5 of the scale here
        scale = expected.abs().max().item()
        torch.testing.assert_close(cache[name], expected, atol=3e-5 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_the_two_state_readers_agree(arch, tiny):
    """TransformerBridge hooks (analysis) and decoder-block hooks with an early stop (training) read the same h_l."""
    loaded = load_model(str(tiny(arch)), device="cpu")
    ids = torch.tensor([loaded.tokenizer("What is 12 + 7? the quick brown fox", add_special_tokens=False)["input_ids"]])
    layers = set(range(loaded.n_layers + 1))
    with torch.no_grad():
        bridge = BridgeStates(loaded.bridge).residual_states(ids, None, layers)
        decoder = residual_states(loaded.hf_model, ids, torch.ones_like(ids), layers)
        stopped = residual_states(loaded.hf_model, ids, torch.ones_like(ids), {1}, stop_after=2)
    assert set(bridge) == set(decoder) == layers | {LNF}
    assert set(stopped) == {1, 2}  # the forward stopped after block 2: no LNf(h_L)
    for key in bridge:
        scale = decoder[key].abs().max().item()
        torch.testing.assert_close(bridge[key], decoder[key], atol=1e-5 * scale, rtol=0, msg=str(key))
    torch.testing.assert_close(stopped[2], decoder[2])


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
@pytest.mark.parametrize("norm_mode", ["none", "final"])
def test_engine_matches_float64_reference(arch, norm_mode, tiny):
    folder = tiny(arch)
    samples = [ip.Sample(id=str(i), **row) for i, row in enumerate(ROWS)]
    result = ip.analyse(model=str(folder), samples=samples, norm_mode=norm_mode, device="cpu")
    reference = reference_summary(reference_model(folder), AutoTokenizer.from_pretrained(folder), ROWS, norm_mode)
    merged = result.summary.merge(reference, on=["layer", "module"], suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == 4 * 3 and (merged["n_tokens"] == merged["n_tokens_ref"]).all()
    for column in ("entropy_in_mean", "entropy_out_mean", "delta_mean"):
        assert (merged[column] - merged[f"{column}_ref"]).abs().max() < 1e-3, column
    cos = merged.dropna(subset=["cos_resid_mean_ref"])
    assert len(cos) == 8 and (cos["cos_resid_mean"] - cos["cos_resid_mean_ref"]).abs().max() < 1e-4
    # peaked enough that the comparison can fail: entropies far from uniform, and modules that change them
    assert reference["entropy_out_mean"].min() < 0.5 * torch.log(torch.tensor(float(len(AutoTokenizer.from_pretrained(folder)))))
    assert reference["delta_mean"].abs().max() > 0.05
    assert result.manifest["block_layout"] == BLOCK_LAYOUT.get(arch, "pre-norm")
    assert result.manifest["logit_transform"] == ("softcap(30.0)" if arch == "gemma2" else "identity")


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
@pytest.mark.parametrize("norm_mode", ["none", "final"])
def test_predictions_match_float64_reference(arch, norm_mode, tiny):
    """What every policy predicts (docs/definitions.md §1): the top-k ids and probabilities and the sampled token's
    probability and rank equal a float64 full softmax, for each of the 5L + 1 states of every analysed token. Logits
    that float32 cannot tell apart (within 1e-5 of the row's largest) may swap one place; the check counts them."""
    folder = tiny(arch)
    samples = [ip.Sample(id=str(i), **row) for i, row in enumerate(ROWS)]
    result = ip.analyse(model=str(folder), samples=samples, norm_mode=norm_mode, top_k=5, batch_tokens=40)
    reference = reference_token_table(reference_model(folder), AutoTokenizer.from_pretrained(folder), ROWS, norm_mode,
                                      top_k=5)
    mine = result.predictions
    merged = mine.merge(reference, on=["sample_index", "position", "layer", "state"], suffixes=("", "_ref"),
                        validate="one_to_one")
    n_layers = result.manifest["n_layers"]
    assert len(merged) == len(mine) == len(reference) == result.manifest["n_tokens"] * (5 * n_layers + 1)
    near = merged["nearest_gap"] < 1e-4  # float32 cannot order these
    assert near.mean() < 0.2  # most rows are checked exactly
    ids_differ = np.array([list(a) != b for a, b in zip(merged["top_ids"], merged["top_ids_ref"])])
    assert not (ids_differ & (merged["top_gap"] >= 1e-4)).any(), "top-k ids differ where the order is clear"
    assert ids_differ.mean() < 0.01
    rank_off = (merged["token_rank"] - merged["token_rank_ref"]).abs()
    assert (rank_off[~near] == 0).all() and (rank_off[near] <= 1).all()
    probs = np.stack(merged["top_probs"].to_numpy()) - np.stack(merged["top_probs_ref"].to_numpy())
    assert np.abs(probs).max() < 2e-3 and (merged["token_prob"] - merged["token_prob_ref"]).abs().max() < 2e-3
    # peaked enough that the comparison can fail: most top-1 policies are sure, the ranks spread over the vocabulary
    assert np.median([p[0] for p in merged["top_probs_ref"]]) > 0.3 and merged["token_rank_ref"].nunique() > 50

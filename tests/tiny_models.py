"""Tiny random causal LMs with peaked next-token distributions, built from configs (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, Olmo2Config, Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 12 + 7? The answer is \\boxed{19}. Please reason step by step, and put your final answer within",
    "system user assistant hello world the quick brown fox jumps over the lazy dog 0123456789 + - * = ?",
]


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


# Every family ipolicy supports, as tiny configs. Gemma-2 soft-caps attention scores and its final logits, and both
# Gemmas norm each module's output before adding it to the residual stream (pre+post-norm blocks); OLMo-2 has only
# the post-norms; GPT-NeoX (Pythia) runs attention and FFN in parallel on h_{l-1}; Qwen3-MoE's FFN is a routed
# mixture of experts (f_l: the weighted sum of the chosen experts' outputs).
ARCHITECTURES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": lambda **c: Qwen3Config(head_dim=16, **c),
    "mistral": MistralConfig,
    "phi3": Phi3Config,
    "gemma2": lambda **c: Gemma2Config(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                                       attn_logit_softcapping=50.0, **c),
    "gemma3": lambda **c: Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, **c),
    "olmo2": Olmo2Config,
    "gpt_neox": lambda **c: GPTNeoXConfig(use_parallel_residual=True, **{k: v for k, v in c.items()
                                                                        if k != "num_key_value_heads"}),
    "qwen3_moe": lambda **c: Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                            **c),
}
ALL_ARCHITECTURES = [*ARCHITECTURES, "gpt2"]


def tiny_model(arch: str = "llama", n_layers: int = 4, seed: int = 0, init_scale: float = 0.5):
    """A random model whose logits are large (init_scale >> 0.02), so policies are peaked and entropies vary."""
    tokenizer = tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_scale,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=n_layers, n_head=4, n_positions=512,
                            initializer_range=init_scale, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        config = ARCHITECTURES[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1; give them some spread so LN outputs differ from plain rescaling
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, tokenizer


def save_tiny_model(folder: Path, arch: str = "llama", **kwargs) -> Path:
    model, tokenizer = tiny_model(arch, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

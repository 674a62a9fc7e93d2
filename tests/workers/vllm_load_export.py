"""Worker for tests/test_vllm_lane.py: load a Hugging Face directory in vLLM as it is (no overrides,
real weights from its safetensors) and print the largest difference between vLLM's log-probs of
its sampled tokens and transformers' of the same sequences.

    vllm_load_export.py MODEL_DIR
"""

import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    import torch
    import transformers
    from vllm import LLM, SamplingParams, TokensPrompt

    model_dir = sys.argv[1]
    mla = "kv_lora_rank" in open(os.path.join(model_dir, "config.json")).read()
    extra = dict(attention_config={"backend": "CPU_MLA"}, compilation_config={"custom_ops": ["-rotary_embedding"]}) \
        if mla else {}
    llm = LLM(model=model_dir, dtype="float32", seed=0, enforce_eager=True, skip_tokenizer_init=True,
              kv_cache_memory_bytes=64 << 20, max_model_len=128, logprobs_mode="processed_logprobs", max_logprobs=0,
              **extra)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3, logprobs=0, ignore_eos=True,
                            detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32",
                                                           attn_implementation="eager").eval()
    worst = 0.0
    for prompt, request in zip(prompts, outputs):
        for sample in request.outputs:
            ids = torch.tensor([prompt + list(sample.token_ids)])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
            ref = logp[len(prompt) - 1:-1].gather(-1, ids[0, len(prompt):, None])[:, 0]
            got = torch.tensor([step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids)],
                               dtype=torch.double)
            worst = max(worst, float((ref - got).abs().max()))
    print(f"MAXDIFF {worst:.3g}")


if __name__ == "__main__":
    main()

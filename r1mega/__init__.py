"""r1mega: GRPO training for the DeepSeek-R1 recipe."""

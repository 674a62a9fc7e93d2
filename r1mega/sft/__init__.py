"""Supervised fine-tuning on the megatron policy: ``r1mega sft`` (cold start, stage 3, distillation)."""

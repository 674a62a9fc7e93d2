"""What every job shares, below the trainers: its run directory and what it writes there
(r1mega.run.logs: metrics, samples, eval, TensorBoard, the curves' PNG), the model it starts from
and the final export (r1mega.run.rundir), a clean stop on SIGTERM (r1mega.run.stop) and the
embedded base model (r1mega.run.base_model, ``r1mega pretrain``).

GRPO (r1mega.trainer), SFT (r1mega.sft), the reward model (r1mega.rm), distillation, evaluation
and the pipeline build on it; nothing here imports them.
"""

"""The GRPO trainer: the loop (r1mega.trainer.loop), its phases (r1mega.trainer.steps), what it
logs (r1mega.trainer.logs) and the embedded base model (r1mega.trainer.pretrain)."""

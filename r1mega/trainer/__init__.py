"""The GRPO trainer: the loop (r1mega.trainer.loop, start there), the phases of one step
(r1mega.trainer.phases) and their tensor work (r1mega.trainer.steps). The run directory, logs and
curves it shares with the other jobs live in r1mega.run."""

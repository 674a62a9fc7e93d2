"""The GRPO trainer: the loop (r1mega.trainer.loop), the phases of one step (r1mega.trainer.steps)
and its curves (r1mega.trainer.panels). The run directory it shares with the other jobs lives in
r1mega.run."""

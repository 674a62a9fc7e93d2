"""``r1mega rm``: a reward model trained with the Bradley-Terry loss on preference pairs (the
scorer of DeepSeek-R1's last RL stage for general prompts), in the exact input format that
:class:`r1mega.rewards.reward_model.RewardModel` scores.

- :func:`load_preference_pairs` (r1mega.rm.data): (prompt, chosen, rejected) rows validated with
  one-line errors naming the file, the row and the field.
- :func:`train_reward_model` (r1mega.rm.train): the trainer; :func:`embedded_pairs` the
  embedded default's train and held-out pairs; :func:`bradley_terry_loss` the loss.
"""

from r1mega.rm.data import load_preference_pairs
from r1mega.rm.train import (PairTokens, bradley_terry_loss, embedded_pairs, pair_accuracy, rm_command,
                             train_reward_model)

__all__ = ["PairTokens", "bradley_terry_loss", "embedded_pairs", "load_preference_pairs", "pair_accuracy",
           "rm_command", "train_reward_model"]

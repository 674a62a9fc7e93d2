"""A byte-level BPE tokenizer trained on a corpus with the `tokenizers` library, saved in Hugging
Face format (``AutoTokenizer.from_pretrained`` loads it; nothing is downloaded).

Digits are split into single tokens before BPE (``Digits(individual_digits=True)``), so numbers
are spelled digit by digit, as arithmetic needs; everything else is byte-level BPE, so any text
round-trips exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def build_tokenizer(texts: Sequence[str], *, vocab_size: int = 512):
    """A PreTrainedTokenizerFast trained on `texts` (pad, bos, eos are ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("build_tokenizer: no texts to train on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

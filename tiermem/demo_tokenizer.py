"""A tiny byte-level BPE tokenizer trained on an embedded text, for the self-contained demo."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad

CORPUS = """\
Large language models are stacks of identical layers. Each layer reads a block of weights,
and a single graphics card often holds only a few of those blocks at once. The rest wait in
host memory or on a solid state drive, and a prefetcher moves each block across the bus just
before the layer that needs it runs. The speed of generation is then set by the slowest link:
bytes that must cross it per step, divided by its bandwidth. Quantizing the weights to four
bits moves a quarter of the bytes, and batching many sequences reuses every block that crossed.
The quick brown fox jumps over the lazy dog. Once upon a time there was a small model that
wanted to be large. It read its weights one layer at a time, and every token it wrote was a
little slower than it wished, but it never ran out of memory, and it never lost a checkpoint.
"""


def train_demo_tokenizer(vocab_size: int, dst: str | Path) -> Path:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens and save tokenizer.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    path = Path(dst) / "tokenizer.json"
    tokenizer.save(str(path))
    return path

"""A character-level tokenizer built in memory (no download), for tests with tiny Llama models."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Every printable ASCII character is one token; vocabulary size 100."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


VOCAB_SIZE = len(SPECIALS) + len(CHARS)

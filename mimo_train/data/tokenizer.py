"""A character-level tokenizer in Hugging Face format, built locally so tests need no downloads.

Every character is its own token, so the synthetic tasks' prompts and answers map one to one
onto ids and a decode gives back the exact text.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0-3, in this order
CHARACTERS = list(string.digits) + list(string.ascii_lowercase) + list("+-=:*, \n")


def vocabulary() -> dict[str, int]:
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer, save it to `directory`, and return it.

    The saved directory loads with `transformers.AutoTokenizer.from_pretrained(directory)`.
    """
    backend = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    # Isolating every character (newline included, which "." would skip) makes each one a
    # word of the WordLevel model.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins the tokens with nothing between them, so decode(encode(text)) == text.
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # Spaces and newlines are content here; cleanup would rewrite them on decode.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of `text`, one per character, with no bos/eos added."""
    return tokenizer.encode(text, add_special_tokens=False)

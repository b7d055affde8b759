"""One tokenizer interface for every kind. A tokenizer serialises to a JSON dict (its `kind` plus
its vocabulary) that travels inside every run and checkpoint, so a model never meets the wrong
vocabulary; `fingerprint()` identifies it.

The kinds, all listed in the static table `KINDS` (registry.py):

- "char"          character level, trained on the corpus            char.py
- "bpe"           byte-level BPE trained on the corpus (HF tokenizers) bpe.py
- "gpt2"          the GPT-2 vocabulary, encoded with tiktoken        gpt2.py
- "gpt1"          the GPT-1 vocabulary (BPE with </w> word ends)     gpt1.py
- "with-specials" any of these plus appended fine-tuning tokens      specials.py

base.py holds the `Tokenizer` interface, `StreamDecoder`, the special tokens and their roles.
This package imports nothing of slmkit above it (no model, data, training or fine-tuning code).
"""

from slmkit.tokenizers.base import (
    DELIM,
    EOT,
    EXTRACT,
    SPECIAL_ROLES,
    SPECIAL_TOKENS,
    START,
    StreamDecoder,
    Tokenizer,
    bytes_to_unicode,
    unicode_to_bytes,
)
from slmkit.tokenizers.bpe import HFByteLevelTokenizer
from slmkit.tokenizers.char import CharTokenizer
from slmkit.tokenizers.gpt1 import GPT1_SPECIALS, GPT1Tokenizer
from slmkit.tokenizers.gpt2 import GPT2_PATTERN, GPT2Tokenizer
from slmkit.tokenizers.registry import (
    KINDS,
    NAMED,
    has_named_tokenizer,
    load_tokenizer,
    named_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)
from slmkit.tokenizers.specials import WithSpecialsTokenizer

__all__ = [
    "DELIM", "EOT", "EXTRACT", "GPT1_SPECIALS", "GPT2_PATTERN", "KINDS", "NAMED", "SPECIAL_ROLES", "SPECIAL_TOKENS",
    "START", "CharTokenizer", "GPT1Tokenizer", "GPT2Tokenizer", "HFByteLevelTokenizer", "StreamDecoder", "Tokenizer",
    "WithSpecialsTokenizer", "bytes_to_unicode", "has_named_tokenizer", "load_tokenizer", "named_tokenizer",
    "save_tokenizer", "tokenizer_from_dict", "unicode_to_bytes",
]

"""Interoperability: the original GPT-1 release, Hugging Face GPT-2 / openai-gpt directories, and
the GPT-1 tokenizer. `slm import` and `slm export` are in `slmkit.cli.interop_cmds`."""

from slmkit.interop.hf import export_hf, import_hf
from slmkit.interop.openai_gpt1 import import_openai_gpt1
from slmkit.tokenizers import GPT1Tokenizer

__all__ = ["GPT1Tokenizer", "export_hf", "import_hf", "import_openai_gpt1"]

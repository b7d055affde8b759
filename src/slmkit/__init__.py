"""slmkit: build small GPT language models from scratch, and take them all the way.

The names below load on first use: `slm` imports only what its command needs, so start-up stays
quick and a Ctrl-C while torch is still loading is one line, not a traceback from an import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "slmkit.model",
    "DataConfig": "slmkit.config",
    "LanguageModel": "slmkit.api",
    "ModelConfig": "slmkit.config",
    "RunConfig": "slmkit.config",
    "TrainConfig": "slmkit.config",
    "load": "slmkit.api",
    "preset_config": "slmkit.config",
    "train": "slmkit.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("sweep", "finetune", "interop"):
        return importlib.import_module(f"slmkit.{name}")
    raise AttributeError(f"module 'slmkit' has no attribute {name!r}")

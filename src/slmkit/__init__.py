"""slmkit: build small GPT language models from scratch, and take them all the way.

The names below load on first use: `slm` imports only what its command needs, so start-up stays
quick and a Ctrl-C while torch is still loading is one line, not a traceback from an import.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["GPT", "DataConfig", "LanguageModel", "ModelConfig", "RunConfig", "TrainConfig", "load",
           "preset_config", "train"]


def __getattr__(name: str) -> Any:
    # Plain imports inside the function: loaded on first use, and still visible to readers and tools.
    if name in ("DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "preset_config"):
        from slmkit import config

        return getattr(config, name)
    if name == "GPT":
        from slmkit.model import GPT

        return GPT
    if name in ("LanguageModel", "load"):
        from slmkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'slmkit' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`slmkit.train` is the training function, also after the `slmkit.train` module is imported
    (the import system records a submodule as an attribute of its package)."""

    @property
    def train(self) -> Any:
        from slmkit.train import train

        return train

    @train.setter
    def train(self, module: Any) -> None:
        pass  # the submodule stays reachable as sys.modules["slmkit.train"]


sys.modules[__name__].__class__ = _Package

"""slmkit: build small GPT language models from scratch, and take them all the way."""

from slmkit.api import LanguageModel, load
from slmkit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset_config
from slmkit.model import GPT
from slmkit.train import train

__all__ = ["GPT", "DataConfig", "LanguageModel", "ModelConfig", "RunConfig", "TrainConfig", "load",
           "preset_config", "train"]
__version__ = "0.1.0"

"""GPT-1-style fine-tuning: the four input transformations, one linear head, the auxiliary LM loss.

    from slmkit.finetune import finetune, FinetuneConfig, FineTuned, get_task
    finetune("runs/gutenberg", get_task("sst2"), "train.tsv", "dev.tsv", "runs/ft-sst2")
    ft = FineTuned.load("runs/ft-sst2")
    ft.evaluate("dev.tsv")

Fine-tuned checkpoints keep their tokenizer as the "with-specials" kind (a vocabulary grown by the
start / delimiter / extract tokens), which `slmkit.tokenizers` reads like any other kind.
"""

from slmkit.finetune.heads import FineTuneModel, add_special_tokens, resize_token_embeddings, transfer_layers
from slmkit.finetune.loop import FinetuneConfig, FineTuned, FinetuneResult, finetune
from slmkit.finetune.tasks import TASKS, Example, TaskSpec, get_task, read_examples, spec_from_flags
from slmkit.finetune.transforms import collate, encode_example, encode_examples
from slmkit.tokenizers import WithSpecialsTokenizer

__all__ = [
    "TASKS", "Example", "FineTuneModel", "FineTuned", "FinetuneConfig", "FinetuneResult", "TaskSpec",
    "WithSpecialsTokenizer", "add_special_tokens", "collate", "encode_example", "encode_examples", "finetune",
    "get_task", "read_examples", "resize_token_embeddings", "spec_from_flags", "transfer_layers",
]

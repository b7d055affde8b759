"""GPT-1-style fine-tuning: the four input transformations, one linear head, the auxiliary LM loss.

    from slmkit.finetune import finetune, FinetuneConfig, FineTuned, get_task
    finetune("runs/gutenberg", get_task("sst2"), "train.tsv", "dev.tsv", "runs/ft-sst2")
    ft = FineTuned.load("runs/ft-sst2")
    ft.evaluate("dev.tsv")

Importing this package registers the "with-specials" tokenizer kind (a vocabulary grown by the
start / delimiter / extract tokens), so fine-tuned checkpoints load anywhere after it.
"""

from slmkit.finetune.heads import FineTuneModel, WithSpecialsTokenizer, add_special_tokens, resize_token_embeddings
from slmkit.finetune.loop import FinetuneConfig, FineTuned, FinetuneResult, finetune
from slmkit.finetune.tasks import TASKS, Example, TaskSpec, get_task, read_examples, spec_from_flags
from slmkit.finetune.transforms import collate, encode_example, encode_examples

__all__ = [
    "TASKS", "Example", "FineTuneModel", "FineTuned", "FinetuneConfig", "FinetuneResult", "TaskSpec",
    "WithSpecialsTokenizer", "add_special_tokens", "collate", "encode_example", "encode_examples", "finetune",
    "get_task", "read_examples", "resize_token_embeddings", "spec_from_flags",
]

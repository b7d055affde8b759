"""Typed configuration: model, data and training settings, presets, and config files.

Every field carries its `--help` text in its metadata, so the CLI is generated from these
dataclasses and can never drift from them. Precedence: preset < config file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from slmkit.errors import UserError, show
from slmkit.options import option

# How a trained model's weights are held for generation and scoring (slmkit.inference).
WEIGHT_FORMATS = ("auto", "int8")
# The MLP activation: GPT-1/GPT-2's tanh approximation of GELU, or the exact (erf) one.
GELU_FORMS = ("tanh", "exact")
# Experiment trackers `--logger` may name, comma-separated (slmkit.tracking writes them; metrics.jsonl is always on).
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")

# Hard caps, far above any real model (GPT-3: 96 layers x 12,288 wide, 2,048 positions; the largest
# vocabularies ~256k) yet low enough that a typo such as n_layer = 1e30 is a clear error instead of an
# allocation. Whether a valid size fits in this machine's memory is checked separately, before training.
MAX_BLOCK_SIZE = 2**20  # 1,048,576 positions
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_WIDTH = 2**17  # n_embd: 131,072
MAX_INNER = 2**20  # n_inner: 1,048,576
MAX_VOCAB = 2**24  # 16,777,216 tokens
MAX_BATCH = 2**20  # batch_size, grad_accum
MAX_STEPS = 10**12  # max_iters, warmup_iters, lr_decay_iters and the intervals
MAX_EVAL_WINDOWS = 10**7  # eval_iters x batch_size: the fixed subsets' offsets are allocated up front
MAX_SAMPLE_TOKENS = 10**6
MAX_EPOCHS = 1e6
# Seeds go to torch.manual_seed and numpy's default_rng as seed + step (+ rank): below 2**63 the sum
# stays inside the unsigned 64-bit range both accept.
SEED_LIMIT = 2**63


# A config field with its --help text; `bounds` (inclusive) for integers are checked by `validate()`.
# Shared with the other settings dataclasses (generation, fine-tuning, sweeps), which the CLI reads alike.
_opt = option


def _describe_bounds(lo: int, hi: int) -> str:
    kind = "a positive integer" if lo == 1 else "a non-negative integer" if lo == 0 else f"an integer >= {lo:,}"
    return f"{kind} no larger than {hi:,}"


def check_fields(obj: Any) -> None:
    """Every field holds its declared type, floats are finite, choices and integer bounds hold.

    Library users and saved files can set anything; this keeps NaN, bools-as-numbers, strings and
    absurd sizes from reaching the model, the optimizer or a seed.
    """
    for f in fields(obj):
        value, kind, name = getattr(obj, f.name), f.type, f.name
        if kind == "bool" and not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {show(value)}")
        if kind == "str" and not isinstance(value, str):
            raise UserError(f"{name} must be a string, got {show(value)}")
        if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise UserError(f"{name} must be a number, got {show(value)}")
        if kind == "int" and not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {show(value)}")
        if kind == "float" and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {show(value)}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}; got {show(value)}")
        bounds = f.metadata.get("bounds")
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise UserError(f"{name} must be {_describe_bounds(*bounds)}, got {show(value)}")


@dataclass
class ModelConfig:
    """The GPT architecture (GPT-1 is post-LN, GPT-2 pre-LN)."""

    vocab_size: int = _opt(0, "vocabulary size; 0 = take it from the tokenizer", cli=False, bounds=(0, MAX_VOCAB))
    block_size: int = _opt(256, "context length in tokens (size of the position table)", bounds=(1, MAX_BLOCK_SIZE))
    n_layer: int = _opt(6, "number of transformer blocks", bounds=(1, MAX_LAYERS))
    n_head: int = _opt(6, "attention heads per block (must divide n_embd)", bounds=(1, MAX_HEADS))
    n_embd: int = _opt(384, "embedding / hidden width", bounds=(1, MAX_WIDTH))
    n_inner: int = _opt(0, "MLP hidden width; 0 = 4 * n_embd", bounds=(0, MAX_INNER))
    dropout: float = _opt(0.0, "dropout on embeddings, attention weights and residual branches")
    attn_dropout: float = _opt(
        -1.0,
        "dropout on attention weights; negative = same as --dropout. Above 0 it forces the slower, memory-hungry "
        "math attention path on CPU (README: measured cost)",
    )
    bias: bool = _opt(True, "use biases in linear layers and layer norms")
    ln: str = _opt("pre", "layer-norm placement: 'post' (GPT-1) or 'pre' (GPT-2)", choices=("pre", "post"))
    gelu: str = _opt(
        "tanh",
        "MLP activation: 'tanh' (the GELU approximation of GPT-1/GPT-2) or 'exact' (erf, nanoGPT's; "
        "cheaper than tanh in bf16 on CPU)",
        choices=GELU_FORMS,
    )
    layer_norm_epsilon: float = _opt(1e-5, "layer-norm epsilon", cli=False)
    scaled_residual_init: bool = _opt(
        True,
        "GPT-2's init: the projections into the residual stream (c_proj) start at std 0.02 / sqrt(2 n_layer) "
        "instead of GPT-1's plain N(0, 0.02)",
    )

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout < 0 else self.attn_dropout

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def validate(self) -> None:
        check_fields(self)
        if self.n_embd % self.n_head != 0:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_dropout >= 1.0:
            raise UserError(f"attn_dropout must be below 1, got {self.attn_dropout}")
        if self.ln not in ("pre", "post"):
            raise UserError(f"ln must be 'pre' or 'post', got {self.ln!r}")
        if self.gelu not in GELU_FORMS:
            raise UserError(f"gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        if not 0.0 <= self.layer_norm_epsilon <= 1.0:
            raise UserError(f"layer_norm_epsilon must be in [0, 1], got {self.layer_norm_epsilon}")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    dataset: str = _opt(
        "shakespeare",
        "a named dataset (shakespeare, tinyshakespeare), a .txt file, a folder of .txt files, a .jsonl/.json/.parquet "
        "file (one document per record), .gz or .zst compressed, a quoted glob ('data/*.parquet'), hf:NAME[:CONFIG] "
        "(the Hugging Face Hub), or a folder slm prepare wrote",
    )
    text_field: str = _opt("text", "the field (JSON) or column (Parquet, hf:) that holds each document's text")
    val_data: str = _opt("", "a separate validation corpus (any --dataset form but a prepared folder); "
                             "replaces cutting --val-fraction off the end of the corpus")
    data_path: str = _opt("", "local copy of a named dataset's file (tinyshakespeare: input.txt)")
    tokenizer: str = _opt("char", "char, bpe (trained on the corpus), gpt2 or gpt1 (both need --vocab-dir)",
                          choices=("char", "bpe", "gpt2", "gpt1"))
    # Not `vocab_size`: that is the model's (a flat `vocab_size = N` in a config file sets the model's).
    bpe_vocab_size: int = _opt(8192, "BPE vocabulary size when --tokenizer bpe (GPT-1 used 40,000 merges)",
                               bounds=(1, MAX_VOCAB), flags=("--vocab-size",))
    vocab_dir: str = _opt("", "folder holding the published vocabulary: encoder.json + vocab.bpe (gpt2), "
                              "encoder_bpe_40000.json + vocab_40000.bpe (gpt1)")
    val_fraction: float = _opt(0.1, "fraction of the corpus (taken from its end) used for validation")
    cache_dir: str = _opt("", "where prepared token files are cached (default: ~/.cache/slmkit)")

    def validate(self) -> None:
        check_fields(self)
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.text_field.strip():
            raise UserError("--text-field must name a field")
        if self.val_data and _is_prepared(self.dataset):
            raise UserError(f"--val-data goes with a text corpus: {self.dataset} is a prepared folder, whose "
                            "validation split was fixed when it was prepared")
        if self.tokenizer == "bpe" and self.bpe_vocab_size < 260:
            raise UserError(f"bpe_vocab_size must be at least 260 (256 bytes + specials), got {self.bpe_vocab_size}")

    def check_vocab_dir(self) -> None:
        """A published vocabulary needs its files: said before any work, naming the flag and the files.

        Not part of validate(): a saved run or checkpoint names its tokenizer but carries it."""
        files = VOCAB_FILES.get(self.tokenizer)
        if files and not self.vocab_dir and not _is_prepared(self.dataset):
            raise UserError(f"the {self.tokenizer} tokenizer needs --vocab-dir with {files}")


# The files of each published vocabulary (the tokenizers package reads them).
VOCAB_FILES = {"gpt2": "encoder.json and vocab.bpe", "gpt1": "encoder_bpe_40000.json and vocab_40000.bpe"}
# The sizes of the published vocabularies, for describing a configuration without its files. GPT-1's
# 40,478 entries are followed by its 3 fine-tuning tokens (start, delimiter, extract).
PUBLISHED_VOCAB_SIZES = {"gpt2": 50257, "gpt1": 40478 + 3}


NAMED_DATASETS = ("shakespeare", "tinyshakespeare")


def is_prepared_folder(path: str | Path) -> bool:
    """A folder `slm prepare` wrote: meta.json beside token files (data.open_prepared says what is
    wrong with a damaged one)."""
    p = Path(path).expanduser()
    return (p / "meta.json").is_file() and any((p / n).exists() for n in ("train.bin", "val.bin", "tokenizer.json"))


def _is_prepared(dataset: str) -> bool:
    """A prepared folder as the dataset brings its own tokenizer (a named dataset never is one)."""
    return dataset not in NAMED_DATASETS and is_prepared_folder(dataset)


@dataclass
class TrainConfig:
    """The optimisation: AdamW, warmup + cosine decay, accumulation, evaluation, precision."""

    batch_size: int = _opt(64, "sequences per micro-batch on each process", bounds=(1, MAX_BATCH))
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", bounds=(1, MAX_BATCH))
    max_iters: int = _opt(5000, "optimizer steps", bounds=(1, MAX_STEPS))
    epochs: float = _opt(0.0, "passes over the training tokens; when > 0 it sets max_iters = ceil(epochs x train "
                              "tokens / tokens per step)")
    learning_rate: float = _opt(1e-3, "peak learning rate", flags=("--lr",))
    min_lr: float = _opt(-1.0, "floor of the cosine decay; negative = learning_rate / 10")
    warmup_iters: int = _opt(100, "linear warmup steps", bounds=(0, MAX_STEPS))
    lr_decay_iters: int = _opt(0, "steps over which the cosine decays; 0 = max_iters", bounds=(0, MAX_STEPS))
    weight_decay: float = _opt(0.1, "AdamW weight decay (applied to weight matrices only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value; 0 = off")
    eval_interval: int = _opt(250, "evaluate on the fixed validation subset every N steps", bounds=(1, MAX_STEPS))
    eval_iters: int = _opt(20, "batches in the fixed validation subset", bounds=(1, MAX_EVAL_WINDOWS))
    final_eval: bool = _opt(True, "after the last step, evaluate the whole validation split (deterministic)")
    log_interval: int = _opt(10, "log training loss every N steps", bounds=(1, MAX_STEPS))
    seed: int = _opt(1337, "random seed (model init, data sampling, dropout); 0 <= seed < 2**63",
                     bounds=(0, SEED_LIMIT - 1))
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu)")
    dtype: str = _opt(
        "auto",
        "auto, float32, bfloat16 or float16 (auto: bf16 autocast on CUDA and on CPUs with native bf16)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    compile: str = _opt("auto", "torch.compile: auto (on for CUDA only), on or off", choices=("auto", "on", "off"))
    sample_tokens: int = _opt(200, "length of the samples written at the end of training; 0 = none",
                              bounds=(0, MAX_SAMPLE_TOKENS))
    checkpoint_interval: int = _opt(0, "also save the last checkpoint every N steps; 0 = at each evaluation",
                                    bounds=(0, MAX_STEPS))
    zeroshot: str = _opt("", "zero-shot tasks scored at every evaluation, as GPT-1's Fig. 2 right: TASK:FILE[,TASK:FILE"
                             "...] with slm zeroshot's tasks and rules; logged to metrics.jsonl and plotted")
    zeroshot_ref: str = _opt("", "TASK=SCORE,...: the score at which a task's normalised curve reaches 1 (default 1.0; "
                                 "0 is random guessing)")
    zeroshot_calibrate: str = _opt("", "cola under --zeroshot: the labelled file its threshold is chosen on")
    zeroshot_limit: int = _opt(0, "--zeroshot scores the first N examples of each file (and of the calibration "
                                  "file); 0 = all", bounds=(0, 2**31 - 1))
    init_from: str = _opt("", "start from this run's (or checkpoint file's) weights and tokenizer instead of random "
                              "weights: continued pre-training on --dataset, with a fresh optimizer and schedule",
                          metavar="RUN")
    logger: str = _opt("", "also log to these experiment trackers, comma-separated: csv (metrics.csv), tensorboard, "
                           "wandb, mlflow (each but csv is an optional extra; metrics.jsonl is always written)",
                       metavar="NAME[,NAME...]")

    @property
    def floor_lr(self) -> float:
        return self.min_lr if self.min_lr >= 0 else self.learning_rate / 10

    def validate(self) -> None:
        check_fields(self)
        if self.eval_iters * self.batch_size > MAX_EVAL_WINDOWS:
            raise UserError(f"eval_iters x batch_size ({self.eval_iters:,} x {self.batch_size:,}) must be at most "
                            f"{MAX_EVAL_WINDOWS:,} windows")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError("beta1 and beta2 must be in [0, 1)")
        if not 0 <= self.epochs <= MAX_EPOCHS:
            raise UserError(f"epochs must be from 0 (off: max_iters decides) to {MAX_EPOCHS:g}, got {self.epochs}")
        logger_names(self.logger)


def logger_names(spec: str) -> list[str]:
    """The trackers a --logger value names ("csv,tensorboard" -> ["csv", "tensorboard"]), each once, in
    order; an unknown name is a one-line error."""
    if not isinstance(spec, str):
        raise UserError(f"logger must be a string of comma-separated names, got {show(spec)}")
    names: list[str] = []
    for name in (part.strip().lower() for part in spec.split(",")):
        if not name:
            continue
        if name not in LOGGERS:
            raise UserError(f"unknown logger {show(name)}; --logger takes {', '.join(LOGGERS)} (comma-separated)")
        if name not in names:
            names.append(name)
    return names


@dataclass
class RunConfig:
    """Everything that defines a pre-training run; saved as config.json in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise UserError(f"a saved configuration must be a mapping of sections, got {show(d)}")
        preset = d.get("preset", "")
        if not isinstance(preset, str):
            raise UserError(f"saved config: preset must be a string, got {show(preset)}")
        cfg = cls(preset=preset)
        apply_overrides(cfg, {sec: d[sec] for sec in SECTIONS if sec in d}, source="saved config")
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# Presets: overrides on top of the defaults. Parameter counts are measured by `slm info --preset`.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The nanoGPT CPU recipe's shape (4 layers, 4 heads, 128 wide, block 64), with a schedule tuned
    # on 2 cores: batch 32 at lr 4e-3 with a short cosine reaches val 1.84 on tiny Shakespeare in
    # 700 steps (1.43M tokens), where nanoGPT's recipe (batch 12, lr 1e-3, 2000 steps) reaches 1.88.
    "cpu-tiny": {
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0},
        "train": {
            "batch_size": 32, "max_iters": 700, "learning_rate": 4e-3, "warmup_iters": 30,
            "eval_interval": 250, "eval_iters": 20, "beta2": 0.99, "weight_decay": 0.1,
        },
    },
    # The default CPU recipe, found by experiments/shakespeare_sweep: at a fixed CPU budget the
    # smallest, fastest model wins. 2 layers x 64 wide runs ~4.5x more tokens/s than cpu-tiny and
    # reaches val ~1.83 on tiny Shakespeare in under 40 s on 2 cores (cpu-tiny needs ~90 s).
    "cpu-fast": {
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "dropout": 0.0},
        "train": {
            "batch_size": 32, "max_iters": 1300, "learning_rate": 4e-3, "warmup_iters": 30,
            "eval_interval": 325, "eval_iters": 20, "beta2": 0.99, "weight_decay": 0.1,
        },
    },
    # Karpathy's character-level Shakespeare model: 6/6/384, block 256, dropout 0.2 (~10.7M params).
    # Two levers keep it fast and lean on CPU: no dropout on the attention weights (it forces the
    # math attention path), and the batch of 64 as 2 micro-batches of 32 (half the activations).
    "shakespeare-char": {
        "model": {
            "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2, "attn_dropout": 0.0,
            "gelu": "exact",
        },
        "train": {
            "batch_size": 32, "grad_accum": 2, "max_iters": 5000, "learning_rate": 1e-3, "warmup_iters": 100,
            "eval_interval": 250, "eval_iters": 20, "beta2": 0.99,
        },
    },
    # GPT-1 as the paper trained it (Radford et al. 2018, section 4.1): 12 post-LN blocks, 768 wide, 12
    # heads, FFN 3072, 512 positions, GELU; residual, embedding and attention dropout 0.1; plain N(0, 0.02)
    # init; GPT-1's BPE vocabulary (40,478 + 3 fine-tuning tokens; needs --vocab-dir). Adam (beta2 0.999,
    # as in OpenAI's released code) on minibatches of 64 x 512 tokens for 100 epochs, lr 2.5e-4 reached
    # linearly over 2,000 steps then cosine-annealed to 0, decoupled weight decay 0.01 on the weights
    # that are neither biases nor gains. README lists what still differs from the paper.
    "gpt1": {
        "model": {
            "n_layer": 12, "n_head": 12, "n_embd": 768, "n_inner": 3072, "block_size": 512,
            "dropout": 0.1, "attn_dropout": -1.0, "ln": "post", "gelu": "tanh", "bias": True,
            "scaled_residual_init": False, "vocab_size": PUBLISHED_VOCAB_SIZES["gpt1"],
        },
        "data": {"tokenizer": "gpt1"},
        "train": {
            "batch_size": 64, "grad_accum": 1, "epochs": 100, "learning_rate": 2.5e-4, "min_lr": 0.0,
            "warmup_iters": 2000, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999,
        },
    },
    # GPT-2 small: pre-LN, 1024 positions, the 50,257-token GPT-2 vocabulary.
    "gpt2-124m": {
        "model": {
            "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "dropout": 0.0,
            "ln": "pre", "vocab_size": 50257,
        },
        "data": {"tokenizer": "gpt2"},
        "train": {"batch_size": 12, "grad_accum": 40, "learning_rate": 6e-4, "warmup_iters": 2000,
                  "beta2": 0.95},
    },
}


def preset_config(name: str) -> RunConfig:
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"unknown preset {show(name)}; choose from: {', '.join(PRESETS)}")
    cfg = RunConfig(preset=name)
    apply_overrides(cfg, PRESETS[name], source=f"preset {name}")
    return cfg


def _coerce(value: Any, target_type: Any, where: str) -> Any:
    """A config-file or command-line value as the field's type, or a one-line error.

    Numbers are never silently changed: 2.5 is not an int, true is not 1, NaN and infinities are
    refused, and a list or a table is never turned into its string form.
    """
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(target_type).replace("builtins.", "")]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true/false, got {show(value)}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {show(value)}")
    # numbers.Real also admits numpy scalars (a sweep or a script may pass them); they leave as int / float.
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise UserError(f"{where}: expected {kind.__name__}, got {show(value)}")
    return _to_float(value, where) if kind is float else _to_int(value, where)


def _to_float(value: numbers.Real | str, where: str) -> float:
    try:
        number = float(value)
    except (ValueError, OverflowError):  # "abc"; an int beyond the float range
        raise UserError(f"{where}: expected float, got {show(value)}") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: expected a finite number, got {show(value)}")
    return number


def _to_int(value: numbers.Real | str, where: str) -> int:
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        try:
            value = float(value)
        except OverflowError:
            raise UserError(f"{where}: {show(value)} is out of range") from None
        # Checked before int(): int(inf) raises, and int(1e30) is a 31-digit integer.
        if not math.isfinite(value) or not value.is_integer():
            raise UserError(f"{where}: expected int, got {show(value)}")
        if abs(value) >= 2**63:
            raise UserError(f"{where}: {show(value)} is out of range")
        return int(value)
    try:
        return int(value)
    except ValueError:  # "abc", "2.5", or a string of more than 4,300 digits
        raise UserError(f"{where}: expected int, got {show(value)}") from None


def set_field(section_obj: Any, name: str, value: Any, where: str) -> None:
    known = {f.name: f for f in fields(section_obj)}
    if not isinstance(name, str) or name not in known:
        raise UserError(f"{where}: unknown setting {show(name)}; known: {', '.join(known)}")
    setattr(section_obj, name, _coerce(value, known[name].type, f"{where}: {name}"))


# Settings renamed since configs were first saved: (section, old name) -> new name. Saved runs,
# checkpoints and [data] tables written before the rename still load.
RENAMED = {("data", "vocab_size"): "bpe_vocab_size"}


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], source: str) -> None:
    """Apply `{section: {name: value}}` overrides; unknown sections or names are clear errors."""
    for section, values in overrides.items():
        if section == "preset":
            continue
        if not isinstance(section, str) or section not in SECTIONS:
            raise UserError(f"{source}: unknown section {show(section)}; use model, data and train")
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{section}] must be a table of settings, got {show(values)}")
        for name, value in values.items():
            name = RENAMED.get((section, name), name) if isinstance(name, str) else name
            set_field(getattr(cfg, section), name, value, f"{source} [{section}]")


def find_section(name: str) -> str:
    """Which section owns a flat hyperparameter name such as `n_layer` or `learning_rate`."""
    for section, cls in SECTIONS.items():
        if name in {f.name for f in fields(cls)}:
            return section
    raise UserError(f"unknown hyperparameter {show(name)}")


def _parse_config_text(p: Path, text: str) -> Any:
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        return tomllib.loads(text)
    except Exception as exc:  # parse errors from either library (YAML raises several kinds)
        message = str(exc).strip().splitlines() or [type(exc).__name__]
        raise UserError(f"cannot parse config file {p}: {message[0]}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config; flat keys (n_layer = 4) are routed to their section."""
    from slmkit.fileio import read_utf8

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    data = _parse_config_text(p, read_utf8(p, "config file"))
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of settings")
    nested: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"config file {p}: [{key}] must be a table of settings, got {show(value)}")
            nested.setdefault(key, {}).update(value)
        elif key == "preset":
            if not isinstance(value, str):
                raise UserError(f"config file {p}: preset must be a preset name, got {show(value)}")
            nested["preset"] = value  # type: ignore[assignment]
        else:
            nested.setdefault(find_section(key), {})[key] = value
    return nested


def resolve_config(
    preset: str | None, config_file: str | None, flags: dict[str, dict[str, Any]], need_vocab_dir: bool = True
) -> RunConfig:
    """preset < config file < flags. `need_vocab_dir=False` describes a configuration (slm info) that
    names a published vocabulary without its files."""
    file_values = load_config_file(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", None)  # type: ignore[assignment]
    file_values.pop("preset", None)
    cfg = preset_config(preset) if preset else RunConfig()
    apply_overrides(cfg, file_values, source=str(config_file))
    apply_overrides(cfg, flags, source="command line")
    cfg.validate()
    if need_vocab_dir:
        cfg.data.check_vocab_dir()
    return cfg

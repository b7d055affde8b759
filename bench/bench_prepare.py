"""Data preparation speed on the 28 MB Gutenberg corpus: BPE training + parallel encoding (JSON).

    python bench/bench_prepare.py --vocab-size 8192
"""

import argparse
import tempfile
import time

from _common import SHARED_DATA, emit, peak_rss_mb

from slmkit.config import DataConfig
from slmkit.data import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(SHARED_DATA / "corpus" / "gutenberg" / "train.txt"))
    ap.add_argument("--tokenizer", default="bpe", choices=("bpe", "gpt2", "char"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--vocab-dir", default=str(SHARED_DATA / "vocab" / "gpt2"))
    args = ap.parse_args()
    cfg = DataConfig(dataset=args.corpus, tokenizer=args.tokenizer, bpe_vocab_size=args.vocab_size,
                     vocab_dir=args.vocab_dir)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = prepare(cfg, out_dir=tmp, progress=False)
        wall = time.perf_counter() - start
        emit({"bench": "prepare", "corpus_mb": round(sum(data.meta["chars"].values()) / 1e6, 2),
              "tokenizer": data.tokenizer.kind, "vocab_size": data.tokenizer.vocab_size,
              "train_tokens": data.meta["tokens"]["train"], "val_tokens": data.meta["tokens"]["val"],
              "wall_s": round(wall, 1), "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()

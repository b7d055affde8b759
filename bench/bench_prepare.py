"""Data preparation speed and memory (JSON lines on stdout, progress on stderr).

    python bench/bench_prepare.py --vocab-size 8192    # the 28 MB Gutenberg corpus, in memory: BPE trained + encoded
    python bench/bench_prepare.py --size-mb 1000       # the streaming, sharded path on a 1 GB corpus

With --size-mb, a corpus of that size (and one of --small-mb, 100 MB) is built in a temporary folder
by repeating the shared Gutenberg text (one .txt file: a single 1 GB document streams too), and
prepared with the GPT-2 tokenizer (tiktoken) and with a BPE tokenizer trained on the small corpus,
with 1 and 2 tokenizer processes (--workers-list). Each preparation runs in its own process; the
peak RSS is that of its whole process tree (the sum over the process and its workers, sampled with
psutil every 50 ms; without psutil, its own peak plus its largest worker's). Throughput is the
corpus's size over the whole wall time (the first pass over the text included). One line per run;
a last line sums them up, with the CPU model.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import SHARED_DATA, cpu_model, emit, peak_rss_mb

from slmkit.config import DataConfig
from slmkit.data import prepare

GUTENBERG = SHARED_DATA / "corpus" / "gutenberg" / "train.txt"


def small_bench(args: argparse.Namespace) -> None:
    """The in-memory path on the 28 MB corpus (as the README's table measures it)."""
    cfg = DataConfig(dataset=args.corpus, tokenizer=args.tokenizer, bpe_vocab_size=args.vocab_size,
                     vocab_dir=args.vocab_dir)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = prepare(cfg, out_dir=tmp, progress=False)
        wall = time.perf_counter() - start
        emit({"bench": "prepare", "corpus_mb": round(sum(data.meta["chars"].values()) / 1e6, 2),
              "tokenizer": data.tokenizer.kind, "vocab_size": data.tokenizer.vocab_size,
              "train_tokens": data.meta["tokens"]["train"], "val_tokens": data.meta["tokens"]["val"],
              "wall_s": round(wall, 1), "peak_rss_mb": peak_rss_mb(), "cpu": cpu_model()})


# ----------------------------------------------------------------------------- the scaling bench


def build_corpus(path: Path, size_mb: int, source: Path) -> int:
    """`source` repeated (whole copies, then a cut at a line end) up to size_mb MB; returns the size."""
    want = size_mb * 1_000_000
    data = source.read_bytes()
    written = 0
    with open(path, "wb") as f:
        while written < want:
            part = data[: want - written]
            if len(part) < len(data):
                part = part[: part.rfind(b"\n") + 1] or part
            f.write(part)
            written += len(part)
            if len(part) < len(data):
                break
    return written


def child(spec: dict) -> None:
    """One preparation, in this process (the parent measures the process tree)."""
    from slmkit.tokenizers import load_tokenizer

    cfg = DataConfig(dataset=spec["corpus"], tokenizer=spec["tokenizer"], vocab_dir=spec["vocab_dir"],
                     bpe_vocab_size=spec["vocab_size"])
    imposed = load_tokenizer(spec["imposed"]) if spec.get("imposed") else None
    start = time.perf_counter()
    data = prepare(cfg, out_dir=spec["out"], progress=False, tokenizer=imposed, workers=spec["workers"])
    wall = time.perf_counter() - start
    m = data.meta
    print(json.dumps({"wall_s": wall, "tokens": m["tokens"]["train"] + m["tokens"]["val"],
                      "shards": sum(len(v) for v in m.get("shards", {}).values()), "vocab_size": m["vocab_size"]}))


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measured(spec: dict) -> dict:
    """Run `child(spec)` in a new process; its result, wall time and peak process-tree RSS."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0]
    try:
        import psutil  # noqa: F401

        sampling = True
    except ImportError:
        sampling = False

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    if sampling:
        thread.start()
    out, _ = proc.communicate()
    if sampling:
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"preparation failed ({proc.returncode}): {spec}")
    result = json.loads(out.strip().splitlines()[-1])
    if not sampling:  # this process's children's peaks: the child's own (its workers' are not seen)
        import resource

        peak[0] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result["peak_rss_mb"] = round(peak[0] / 2**20, 1)
    result["rss_measure"] = "process tree, psutil" if sampling else "largest process, getrusage"
    return result


def scale_bench(args: argparse.Namespace) -> None:
    source = Path(args.corpus)
    tmp = Path(tempfile.mkdtemp(prefix="slmkit-bench-prepare-", dir=args.tmp))
    rows = []
    try:
        sizes = sorted({args.small_mb, args.size_mb})
        corpora = {}
        for mb in sizes:
            print(f"building a {mb} MB corpus from {source} ...", file=sys.stderr)
            corpora[mb] = tmp / f"corpus_{mb}mb.txt"
            corpora[mb] = (corpora[mb], build_corpus(corpora[mb], mb, source))
        runs = []
        for tok in args.tokenizers.split(","):
            imposed = None
            if tok == "bpe":  # trained once, on the small corpus (streamed); encoding runs use it as it is
                path, size = corpora[sizes[0]]
                print(f"training BPE {args.vocab_size} on {size / 1e6:.0f} MB ...", file=sys.stderr)
                spec = {"corpus": str(path), "tokenizer": "bpe", "vocab_dir": args.vocab_dir,
                        "vocab_size": args.vocab_size, "workers": 2, "out": str(tmp / "bpe")}
                r = measured(spec)
                row = {"bench": "prepare_scale", "what": "bpe trained + encoded", "tokenizer": "bpe",
                       "corpus_mb": round(size / 1e6), "workers": 2, "wall_s": round(r["wall_s"], 1),
                       "mb_per_s": round(size / 1e6 / r["wall_s"], 2), "tokens": r["tokens"],
                       "peak_rss_mb": r["peak_rss_mb"]}
                emit(row)
                rows.append(row)
                imposed = str(tmp / "bpe" / "tokenizer.json")
            for mb in sizes:
                for w in [int(x) for x in args.workers_list.split(",")]:
                    runs.append((tok, mb, w, imposed))
            if tok == "gpt2" and args.in_memory:
                runs.append((tok, sizes[0], None, None))
        for tok, mb, w, imposed in runs:
            path, size = corpora[mb]
            out = tmp / "out"
            print(f"{tok}, {mb} MB, {w or 'in-memory path'} worker(s) ...", file=sys.stderr)
            spec = {"corpus": str(path), "tokenizer": tok, "vocab_dir": args.vocab_dir, "vocab_size": args.vocab_size,
                    "workers": w, "out": str(out), "imposed": imposed}
            r = measured(spec)
            shutil.rmtree(out, ignore_errors=True)
            row = {"bench": "prepare_scale", "tokenizer": tok, "vocab_size": r["vocab_size"],
                   "corpus_mb": round(size / 1e6), "workers": w if w else "in-memory path",
                   "wall_s": round(r["wall_s"], 1), "mb_per_s": round(size / 1e6 / r["wall_s"], 2),
                   "tokens": r["tokens"], "shards": r["shards"], "peak_rss_mb": r["peak_rss_mb"],
                   "rss_measure": r["rss_measure"]}
            emit(row)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit({"bench": "prepare_scale_summary", "cpu": cpu_model(), "cores": os.cpu_count(),
          "runs": [{k: r[k] for k in ("tokenizer", "corpus_mb", "workers", "mb_per_s", "peak_rss_mb")} for r in rows]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(GUTENBERG))
    ap.add_argument("--tokenizer", default="bpe", choices=("bpe", "gpt2", "char"), help="without --size-mb")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--vocab-dir", default=str(SHARED_DATA / "vocab" / "gpt2"))
    ap.add_argument("--size-mb", type=int, default=0, help="the scaling bench: the large corpus's size in MB")
    ap.add_argument("--small-mb", type=int, default=100, help="the scaling bench: the small corpus's size in MB")
    ap.add_argument("--workers-list", default="1,2", help="the scaling bench: worker counts to run")
    ap.add_argument("--tokenizers", default="gpt2,bpe", help="the scaling bench: tokenizers to run")
    ap.add_argument("--in-memory", action="store_true", help="the scaling bench: also the in-memory path, small corpus")
    ap.add_argument("--tmp", default=None, help="where the corpora and outputs go (default: the system's temp)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
    elif args.size_mb:
        scale_bench(args)
    else:
        small_bench(args)


if __name__ == "__main__":
    main()

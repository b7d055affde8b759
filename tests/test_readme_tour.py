"""The README's commands run as written, top to bottom, with small iteration counts.

Every ```bash block of the README is split into commands; each runs in a fresh folder that has
`../shared` beside it (as a checkout has), in order, so that later commands use the runs earlier
ones made. Only lengths are shortened (steps, tokens, epochs, trial seconds, examples); the rest
of each command is exactly the README's. Commands that need what no test machine has (the
original GPT-1 release, the Hugging Face Hub, a user's own files, pip) are listed in SKIP, each
with its reason; the README marks those places as the user's own paths.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED

README = REPO / "README.md"

# Substrings of commands that cannot run on a test machine, with the reason.
SKIP = {
    "pip install": "installs packages; CI installs the project itself",
    "finetune-transformer-lm/": "the original GPT-1 release is a user download",
    "runs/gpt1": "made by the GPT-1 release import above",
    "openai-community/": "downloads from the Hugging Face Hub",
    "path/to/": "a user's own folder",
    "my_corpus.txt": "a user's own file",
    "train.tsv --dev dev.tsv": "a user's own task files",
    "train.jsonl --dev dev.jsonl": "a user's own task files",
    "train.csv --dev dev.csv": "a user's own task files",
    "experiments/": "a full experiment (tens of minutes); its own README has its numbers",
    "python -m pytest": "the test suite itself",
    "runs/gpt2": "made by the Hugging Face import of a user's folder above",
    "hf/gpt2": "made by the export of the run above",
    "slm serve --run": "a server runs until Ctrl-C; tests/test_serve.py starts one and runs the README's examples",
    "127.0.0.1:8000": "requests to the server above: tests/test_serve.py runs them against its own server",
    "lambada_openai": "lm-eval's standard tasks download their data from the Hugging Face Hub",
    "--include-path my_tasks": "a user's own task folder (tests/test_lm_eval.py writes and runs such tasks offline)",
    "python -m slmkit.evalharness": "lm_eval's own command line on a Hub task (downloads its data)",
    "--nnodes 2": "multi-node training needs several machines",
    "sweeps/big": "a sweep on a PostgreSQL server across several machines (tests/test_sweep_storage.py and "
                  "tests/drills/test_drill_sweep_workers.py run sweeps on a real server)",
}


def readme_commands(text: str) -> list[str]:
    """Each command of each ```bash block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  # ")[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split(" && ") if part.strip())
    return commands


def shorten(cmd: str) -> str:
    """The same command with fewer steps, tokens, epochs and examples."""
    sub = re.sub
    if "slm train" in cmd:
        resume = "--resume" in cmd
        cap = 40 if resume else 30
        if "--max-iters" in cmd:
            cmd = sub(r"--max-iters \d+", f"--max-iters {cap if resume else 30}", cmd)
        elif not resume:
            cmd += " --max-iters 30"
        if not resume:
            cmd += " --eval-interval 15 --eval-iters 2 --sample-tokens 20"
    if "slm generate" in cmd:
        cmd = sub(r"--max-new-tokens \d+", "--max-new-tokens 40", cmd)
        if "--max-new-tokens" not in cmd:
            cmd += " --max-new-tokens 40"
    if "slm finetune" in cmd:
        cmd = sub(r"--max-train \d+", "--max-train 200", cmd) + " --epochs 1"
    if "slm sweep" in cmd and "report" not in cmd and "--resume" not in cmd:
        cmd = sub(r"--trial-seconds \d+", "--trial-seconds 2", cmd)
        cmd = sub(r"--max-iters \d+", "--max-iters 10", cmd)
        cmd = sub(r"--eval-interval \d+", "--eval-interval 5", cmd)
        cmd = sub(r"--(random|trials) \d+", r"--\1 2", cmd)
        if "--finetune-task" in cmd:  # the fine-tune objective: a few labels, one epoch
            cmd = sub(r"max_train=\d+", "max_train=100", cmd) + " --finetune-set epochs=1"
    return cmd


def skip_reason(cmd: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in cmd), None)


def test_the_readme_tour_runs_as_written(tmp_path):
    if not (SHARED / "data").is_dir():
        pytest.skip(f"needs {SHARED / 'data'} (the shared data folder beside the checkout is absent)")
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    ran, failures = 0, []
    for cmd in readme_commands(README.read_text()):
        if skip_reason(cmd):
            continue
        short = shorten(cmd)
        r = subprocess.run(["bash", "-o", "pipefail", "-c", short], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
        ran += 1
        if r.returncode != 0:
            failures.append(f"{short}\n  -> exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    assert not failures, "README commands that failed:\n" + "\n".join(failures)
    assert ran >= 25


def test_no_skip_rule_is_stale_and_most_commands_run():
    commands = readme_commands(README.read_text())
    for key in SKIP:
        assert any(key in c for c in commands), f"SKIP rule {key!r} matches no README command any more"
    slm_commands = [c for c in commands if "slm " in c]
    assert sum(bool(skip_reason(c)) for c in slm_commands) < len(slm_commands) / 3

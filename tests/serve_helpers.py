"""A tiny trained run and a real `slm serve` process on a free local port, for the server's tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import tiny_config


def train_tiny_run(folder: Path, iters: int = 60) -> Path:
    """A character model (block 64) trained a little on repetitive text: confident enough that
    greedy answers have no near-ties."""
    import slmkit

    corpus = folder / "corpus.txt"
    lines = []
    for i in range(400):
        animal, place = ["cat", "dog", "bird", "fox"][i % 4], ["mat", "log", "hat"][i % 3]
        lines.append(f"the {animal} sat on the {place} number {i % 7}.")
        if i % 8 == 0:  # turns in the chat template's shape, so that a chat reply can end
            lines.append(f"User: the {animal}\nAssistant: the {animal} sat on the {place}.")
        if i % 50 == 0:  # the characters of the README's examples
            lines.append("ROMEO: JULIET: Who art thou? KING RICHARD!")
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = tiny_config(corpus, max_iters=iters, eval_interval=iters, sample_tokens=0, final_eval=False)
    cfg.model.block_size = 64
    run = folder / "tiny-shakespeare"  # the README's name, so that its examples run as shown
    slmkit.train(cfg, run, overwrite=True)
    return run


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, base: str, log: Path, run: Path):
        self.proc, self.base, self.log = proc, base, log
        self.run, self.name = run, run.name  # the first run served, and its model name

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=10).json()

    def running(self) -> int:
        return sum(m["running"] + m["waiting"] for m in self.health()["models"].values())


@contextmanager
def serve(*runs: Path, args: tuple[str, ...] = (), log_dir: Path):
    """`slm serve` on a free port (--port 0; the port is read from its first stderr line)."""
    log = log_dir / f"serve-{time.monotonic_ns()}.err"
    argv = [sys.executable, "-m", "slmkit", "serve", "--port", "0", *args]
    for run in runs:
        argv += ["--run", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        base = _wait_for_port(proc, log)
        yield ServerProcess(proc, base, log, Path(runs[0]))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(proc: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", log.read_text())
        if found:
            base = found.group(1)
            try:
                httpx.get(f"{base}/health", timeout=5)
                return base
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"slm serve exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"slm serve did not start in {timeout} s: {log.read_text()}")

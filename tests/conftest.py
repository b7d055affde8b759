"""Shared fixtures: the ../shared data beside the checkout, tiny corpora and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLMKIT_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the shared data folder beside the checkout is absent)")
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Prepared datasets go to a per-session cache, never the user's ~/.cache."""
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path_factory.getbasetemp() / "slmkit-cache"))


def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a
    shared 2-core machine, OpenMP threads spinning against other jobs make tiny models several times
    slower than one thread."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def module_one_torch_thread():
    """one_torch_thread for a whole module, module-scoped fixtures included (they are set up before a
    test's own fixtures, so they request this one by name)."""
    yield from _one_torch_thread()


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """About 20 KB of repetitive but learnable text."""
    lines = []
    for i in range(400):
        animal, place = ["cat", "dog", "bird", "fox"][i % 4], ["mat", "log", "hat"][i % 3]
        lines.append(f"the {animal} sat on the {place} number {i % 7}.")
    p = tmp_path / "tiny.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def tiny_config(corpus: Path, **train_overrides):
    from slmkit.config import RunConfig

    cfg = RunConfig()
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size = 2, 2, 32, 32
    cfg.model.dropout = 0.0
    cfg.data.dataset = str(corpus)
    t = cfg.train
    t.batch_size, t.max_iters, t.eval_interval, t.eval_iters = 8, 20, 10, 2
    t.warmup_iters, t.learning_rate, t.sample_tokens, t.log_interval = 2, 3e-3, 20, 1
    t.device, t.dtype = "cpu", "float32"
    for k, v in train_overrides.items():
        setattr(t, k, v)
    return cfg


def one_error_line(stderr: str) -> str:
    """The whole of stderr is one `error: ...` line (no traceback, nothing else); return it."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def cli_fails(argv: list, capsys, match: str | None = None) -> str:
    """Run `slm argv` in-process; it must exit non-zero with one `error:` line, which is returned."""
    import re

    from slmkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code not in (0, None)
    line = one_error_line(capsys.readouterr().err)
    if match is not None:
        assert re.search(match, line), line
    return line


def import_script(path: Path, name: str):
    """An experiment script (not a package module) imported as `name`; registered in sys.modules first,
    since dataclasses look their module up there."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

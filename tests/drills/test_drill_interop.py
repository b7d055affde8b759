"""Drills on `slm import` / `slm export`: user files next to slmkit's output, folders slmkit did not
write, a full disk half way, shard indexes that point outside the model folder, malicious pickles.

Every drill goes through the real CLI (`slmkit.cli.main`) and checks what a user sees (one line,
exit 1) and what is left on disk (the user's files byte for byte, no half-written output, no
temporary folder). The models are tiny GPT-2-format folders written here, so no download and no
`transformers` is needed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit.checkpoint import load_checkpoint, load_model
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.fileio import MARKER, TMP_SUFFIX
from slmkit.interop import common, hf, safetensors_io
from slmkit.interop.hf import expected_shapes, hf_from_ours, import_hf, is_conv
from slmkit.tokenizers import EOT, bytes_to_unicode

TINY = dict(n_positions=16, n_embd=8, n_layer=1, n_head=2)
MERGES = ["Ġ t", "h e"]


# ----------------------------------------------------------------------------- tiny HF folders


def gpt2_vocab() -> dict[str, int]:
    """A GPT-2-style vocabulary: the 256 byte tokens (ids are merge ranks), two merges, then EOT."""
    encoder = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for m in MERGES:
        encoder["".join(m.split(" "))] = len(encoder)
    encoder[EOT] = len(encoder)
    return encoder


def hf_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face's gpt2 names and layouts (Conv1D matrices are [in, out])."""
    vocab = len(gpt2_vocab())
    cfg = ModelConfig(vocab_size=vocab, block_size=TINY["n_positions"], n_layer=TINY["n_layer"],
                      n_head=TINY["n_head"], n_embd=TINY["n_embd"], dropout=0.0, bias=True, ln="pre")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for ours, shape in expected_shapes(cfg).items():
        out[hf_from_ours(ours, "gpt2")] = torch.randn(shape[::-1] if is_conv(ours) else shape, generator=g) * 0.1
    return out


def hf_folder(path: Path, seed: int = 0, shards: int = 0) -> dict[str, torch.Tensor]:
    """A GPT-2-format folder: config.json, vocab.json + merges.txt, and model.safetensors (or `shards` shard
    files with a model.safetensors.index.json)."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = gpt2_vocab()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": len(vocab),
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, **TINY}
    (path / "config.json").write_text(json.dumps(config))
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    tensors = hf_tensors(seed)
    if not shards:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two tiny models (different weights) and one run imported from the first, shared by the drills."""
    base = tmp_path_factory.mktemp("interop-sources")
    hf_folder(base / "hf-a", seed=0)
    hf_folder(base / "hf-b", seed=1)
    import_hf(base / "hf-a", base / "run")
    return {"a": base / "hf-a", "b": base / "hf-b", "run": base / "run"}


# ----------------------------------------------------------------------------- helpers


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run `slm ARGS` in-process; (exit code, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, pattern: str) -> str:
    """Exit 1 with exactly one line `error: ...` matching `pattern`, free of terminal codes."""
    lines = err.splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "\x1b" not in err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder`: file contents, or None for a folder."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(TMP_SUFFIX)]


def user_folder(path: Path) -> dict[str, bytes | None]:
    """A folder of the user's own: a file, a subfolder with a file, a hidden file."""
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "data" / "corpus.txt").write_text("precious text\n")
    (path / ".hidden").write_text("x")
    return snapshot(path)


def import_args(src: Path, out: Path | str, *extra: str) -> list[str]:
    return ["import", "--format", "hf", "--src", str(src), "--out", str(out), *extra]


def export_args(run: Path, out: Path | str, *extra: str) -> list[str]:
    return ["export", "--run", str(run), "--out", str(out), *extra]


def wte_of(run: Path) -> torch.Tensor:
    return load_checkpoint(run / "ckpt_best.safetensors").model_state()["transformer.wte.weight"]


# ----------------------------------------------------------------------------- --overwrite keeps user files


def test_import_overwrite_replaces_only_slmkit_files(tmp_path, capsys, sources):
    out = tmp_path / "run"
    assert cli(capsys, *import_args(sources["a"], out))[0] == 0
    mine = {p.name for p in out.iterdir()}
    assert {"ckpt_best.safetensors", "config.json", "tokenizer.json", MARKER} <= mine
    (out / "my-notes.txt").write_text("keep me\n")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("a,b\n")

    code, err = cli(capsys, *import_args(sources["b"], out))
    assert_refused(code, err, "already holds slmkit import output; pass --overwrite")

    assert cli(capsys, *import_args(sources["b"], out, "--overwrite"))[0] == 0
    assert (out / "my-notes.txt").read_text() == "keep me\n"
    assert (out / "eval" / "scores.csv").read_text() == "a,b\n"
    assert {p.name for p in out.iterdir()} == mine | {"my-notes.txt", "eval"}
    # The weights are model b's now, and the run works as any run does.
    assert torch.equal(wte_of(out), hf_tensors(1)["transformer.wte.weight"])
    model, tok, ckpt = load_model(out)
    assert ckpt.config.data.vocab_dir == str(out.resolve())
    assert tok.decode(tok.encode("the cat")) == "the cat"
    assert cli(capsys, "generate", "--run", out, "--prompt", "the", "--max-new-tokens", "3", "--seed", "1")[0] == 0
    assert leftovers(tmp_path) == []


def test_export_overwrite_replaces_only_slmkit_files(tmp_path, capsys, sources):
    out = tmp_path / "hf"
    assert cli(capsys, *export_args(sources["run"], out))[0] == 0
    exported = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= exported
    (out / "README.md").write_text("# my model card\n")
    assert cli(capsys, *export_args(sources["run"], out, "--no-tokenizer", "--overwrite"))[0] == 0
    assert (out / "README.md").read_text() == "# my model card\n"
    # The tokenizer files were slmkit's and this export has none: they are gone, the user's file is not.
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", MARKER, "README.md"}
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["transformer.wte.weight"], wte_of(sources["run"]))


# ----------------------------------------------------------------------------- folders slmkit did not write


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("command", ["import", "export"])
def test_folder_of_the_user_is_refused_whatever_overwrite_says(tmp_path, capsys, sources, command, overwrite):
    out = tmp_path / "mine"
    before = user_folder(out)
    extra = ["--overwrite"] if overwrite else []
    args = import_args(sources["a"], out, *extra) if command == "import" else export_args(sources["run"], out, *extra)
    code, err = cli(capsys, *args)
    assert_refused(code, err, r"--out-dir .*mine is not empty and was not written by slmkit")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_out_dot_is_refused_in_a_folder_of_the_user(tmp_path, capsys, sources, monkeypatch):
    cwd = tmp_path / "home"
    before = user_folder(cwd)
    monkeypatch.chdir(cwd)
    for args in (import_args(sources["a"], ".", "--overwrite"), export_args(sources["run"], ".", "--overwrite"),
                 import_args(sources["a"], "data/..", "--overwrite")):
        code, err = cli(capsys, *args)
        assert_refused(code, err, "is not empty and was not written by slmkit")
        assert snapshot(cwd) == before
    assert leftovers(tmp_path) == []


def test_out_dot_in_an_empty_folder_imports_there(tmp_path, capsys, sources, monkeypatch):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert cli(capsys, *import_args(sources["a"], "."))[0] == 0
    assert torch.equal(wte_of(cwd), hf_tensors(0)["transformer.wte.weight"])
    assert leftovers(tmp_path) == [] and leftovers(cwd) == []


def test_export_never_writes_into_a_run_of_another_kind(tmp_path, capsys, sources):
    run = tmp_path / "run"
    shutil.copytree(sources["run"], run)
    before = snapshot(run)
    code, err = cli(capsys, *export_args(run, run, "--overwrite"))
    assert_refused(code, err, "holds slmkit import output, not export output")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- a full disk half way


def _enospc(path: Path, partial: bytes = b"{\"half") -> None:
    """What a full disk does: part of the file is written, then the write fails."""
    Path(path).write_bytes(partial)
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_mid_import_leaves_nothing_half_written(tmp_path, capsys, sources, monkeypatch, existing):
    out = tmp_path / "run"
    if existing:
        assert cli(capsys, *import_args(sources["a"], out))[0] == 0
    before = snapshot(out)
    # After the vocabulary, the weights and config.json, before tokenizer.json.
    monkeypatch.setattr(common, "save_tokenizer", lambda tok, path: _enospc(path))
    code, err = cli(capsys, *import_args(sources["b"], out, "--overwrite"))
    line = assert_refused(code, err, "no space left on the device")
    assert TMP_SUFFIX not in line  # the message names --out, not the temporary folder
    assert snapshot(out) == before
    assert out.exists() == existing
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_full_disk_mid_export_leaves_the_previous_export_intact(tmp_path, capsys, sources, monkeypatch, where):
    out = tmp_path / "hf"
    assert cli(capsys, *export_args(sources["run"], out))[0] == 0
    before = snapshot(out)
    if where == "tokenizer":
        monkeypatch.setattr(hf, "write_hf_tokenizer", lambda tok, d, n: _enospc(d / "tokenizer.json"))
    else:
        real_open = open

        class FullDisk:
            """A file that takes 1,000 bytes, then reports a full disk (inside model.safetensors)."""

            def __init__(self, path, mode):
                self.f = real_open(path, mode)

            def write(self, data) -> int:
                if self.f.tell() + len(data) > 1000:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.f.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monkeypatch.setattr(safetensors_io, "open", FullDisk, raising=False)
    code, err = cli(capsys, *export_args(sources["run"], out, "--overwrite"))
    line = assert_refused(code, err, "no space left on the device")
    assert TMP_SUFFIX not in line and str(out) in line
    assert snapshot(out) == before
    assert leftovers(tmp_path) == [] and leftovers(out) == []


# ----------------------------------------------------------------------------- shard indexes


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, Path]:
    """A sharded model folder, and a valid shard lying outside it (what an escaping index would read)."""
    src = tmp_path / "models" / "sharded"
    hf_folder(src, seed=0, shards=2)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(src / "model-00001-of-00002.safetensors", outside / "stolen.safetensors")
    return src, outside / "stolen.safetensors"


def _point_index(src: Path, old: str, new: str) -> None:
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (new if v == old else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


def test_sharded_import_reads_shards_inside_the_folder(tmp_path, capsys, sharded):
    src, _ = sharded
    assert cli(capsys, *import_args(src, tmp_path / "run"))[0] == 0
    assert torch.equal(wte_of(tmp_path / "run"), hf_tensors(0)["transformer.wte.weight"])


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink", "passwd"])
def test_shard_index_pointing_outside_the_source_is_refused(tmp_path, capsys, sharded, how):
    src, stolen = sharded
    first = "model-00001-of-00002.safetensors"
    if how == "relative":
        _point_index(src, first, "../../elsewhere/stolen.safetensors")
    elif how == "absolute":
        _point_index(src, first, str(stolen))
    elif how == "passwd":
        _point_index(src, first, "../" * 30 + "etc/passwd")
    else:
        (src / first).unlink()
        (src / first).symlink_to(stolen)
    code, err = cli(capsys, *import_args(src, tmp_path / "run"))
    assert_refused(code, err, r"model\.safetensors\.index\.json lists shard .* which lies outside .*; refused")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("index", [
    "{not json", "[1, 2]", '{"weight_map": ["model.safetensors"]}', '{"weight_map": {"a": 5}}',
    '{"weight_map": {}}', '{"metadata": {}}', b"\xff\xfe",
])
def test_malformed_shard_index_is_one_line(tmp_path, capsys, sharded, index):
    src, _ = sharded
    path = src / "model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    code, err = cli(capsys, *import_args(src, tmp_path / "run"))
    assert_refused(code, err, r"model\.safetensors\.index\.json")


# ----------------------------------------------------------------------------- malicious pickles


class Evil:
    """Unpickling this runs a shell command: what a booby-trapped pytorch_model.bin does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, capsys, monkeypatch, zip_format):
    src = tmp_path / "evil-model"
    tensors = hf_folder(src)
    (src / "model.safetensors").unlink()
    pwned = tmp_path / "PWNED"
    payload = {**tensors, "transformer.h.0.attn.bias": Evil(f"touch {pwned}")}
    torch.save(payload, src / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(UserError) as raised:  # the library's own message, before the CLI tidies anything
        import_hf(src, tmp_path / "run")
    message = str(raised.value)
    assert "\n" not in message and "\x1b" not in message
    assert message.startswith(f"{src / 'pytorch_model.bin'} holds Python objects other than tensors; refused")
    assert message.endswith("model.safetensors")  # complete, not cut off mid-sentence

    code, err = cli(capsys, *import_args(src, tmp_path / "run2"))
    assert_refused(code, err, "holds Python objects other than tensors; refused .slmkit never unpickles code")
    assert not pwned.exists() and not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_plain_pytorch_bin_still_imports_and_garbage_is_one_line(tmp_path, capsys):
    src = tmp_path / "bin-model"
    tensors = hf_folder(src, seed=3)
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    assert cli(capsys, *import_args(src, tmp_path / "run"))[0] == 0
    assert torch.equal(wte_of(tmp_path / "run"), tensors["transformer.wte.weight"])
    for junk in (b"\x80\x02garbage" * 10, (src / "pytorch_model.bin").read_bytes()[:300]):
        (src / "pytorch_model.bin").write_bytes(junk)
        with pytest.raises(UserError) as raised:
            import_hf(src, tmp_path / "run2")
        assert "\n" not in str(raised.value) and "\x1b" not in str(raised.value)
        assert "pytorch_model.bin" in str(raised.value)

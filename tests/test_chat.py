"""`slm chat` and `slm generate --interactive` in a real pseudo-terminal: streaming, the /commands,
Ctrl-C and Ctrl-D as a terminal sends them (signals and end of input), and piped input."""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import REPO

from slmkit.chat import TURN_STOPS, render_chat
from slmkit.cli import main

TIMEOUT = 60.0  # seconds for one expected output: start-up (importing torch) on a busy machine included
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TERM": "xterm"}
# The greedy replies are compared with ones computed in this process, in float32 on the CPU: the
# children must not pick bf16 (dtype auto does, on a CPU with native bf16).
PRECISION = ("--device", "cpu", "--dtype", "float32")
# The child makes the pseudo-terminal its controlling terminal, then becomes `python -m slmkit ...`:
# so b"\x03" typed there is a SIGINT, as at a real terminal. (A new session has no controlling
# terminal until it asks for one; exec'ing a fresh interpreter runs no Python code after fork.)
CTTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")  # readline's terminal codes, and CR of CRLF
PROMPT = "\n> "  # the model's vocabulary has no ">": a prompt is never part of a reply


class Terminal:
    """A command on a pseudo-terminal of its own, with reads that time out."""

    def __init__(self, *argv: object):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-c", CTTY, "-m", "slmkit", *map(str, argv)],
                                     stdin=slave, stdout=slave, stderr=slave, env=ENV, start_new_session=True)
        os.close(slave)
        self.fd, self.raw, self.pos = master, "", 0
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def text(self) -> str:
        return ESCAPES.sub("", self.raw)

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The output since the last match, up to and including the first match of `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        while not (m := re.compile(pattern).search(self.text(), self.pos)):
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"no {pattern!r} within {timeout} s; output so far: {self.text()[self.pos:]!r}")
        out, self.pos = self.text()[self.pos:m.end()], m.end()
        return out

    def _read(self, timeout: float) -> bool:
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program has closed the terminal
            return False
        self.raw += self.decoder.decode(data)
        return bool(data)

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def line(self, text: str) -> str:
        """Type a line at the prompt; what the program wrote before the next prompt (echo excluded)."""
        self.send(text + "\r")
        out = self.expect(re.escape(PROMPT))
        assert out.startswith(text + "\n"), out
        return out[len(text) + 1:-len(PROMPT)]

    def exit_code(self, timeout: float = TIMEOUT) -> int:
        while self._read(0.1):  # keep draining, so the program never blocks on a full terminal
            pass
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny character model trained on chat transcripts (about 3 s)."""
    root = tmp_path_factory.mktemp("chat")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"User: where is the {a}?\nAssistant: the {a} sat on the {p}.\n"
                              for a, p in zip(["cat", "dog", "bird", "fox"] * 60, ["mat", "log", "hat"] * 80,
                                              strict=False)))
    out = root / "run"
    main([str(a) for a in [
          "train", "--dataset", corpus, "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "64",
          "--batch-size", "8", "--max-iters", "40", "--eval-interval", "20", "--eval-iters", "2", "--learning-rate",
          "1e-2", "--warmup-iters", "2", "--device", "cpu", "--dtype", "float32", "--sample-tokens", "0",
          "--no-final-eval", "--quiet", "--out-dir", out, "--cache-dir", root / "cache"]])
    return out


@pytest.fixture
def term(run_dir):
    """Start `slm ARGS` on a pseudo-terminal (waiting for its first prompt); closed after the test."""
    started: list[Terminal] = []

    def start(*argv: object) -> Terminal:
        t = Terminal(*argv, *PRECISION)
        started.append(t)
        t.expect(re.escape("/help") + r".*\n> ")  # the banner (on stderr), then the prompt
        return t

    yield start
    for t in started:
        t.close()


def greedy(run_dir: Path, prompt: str, n: int, stop: tuple[str, ...] = ()) -> str:
    """What the model continues `prompt` with at temperature 0, computed here, in-process."""
    import slmkit

    lm = slmkit.load(run_dir, device="cpu", dtype="float32")
    return lm.generate(prompt, max_new_tokens=n, temperature=0, stop=stop)[0]


def chat_reply(run_dir: Path, user: str, n: int) -> str:
    return greedy(run_dir, render_chat([{"role": "user", "content": user}]), n, TURN_STOPS).lstrip()


def test_a_prompt_streams_the_reply_and_the_prompt_returns(term, run_dir):
    t = term("chat", "--run", run_dir, "--max-new-tokens", "30", "--temperature", "0")
    reply = t.line("where is the cat?")
    assert reply == chat_reply(run_dir, "where is the cat?", 30)
    assert reply.strip()  # the model wrote something: the comparison above is not between two empty strings
    t.send("/quit\r")
    assert t.exit_code() == 0


def test_greedy_gives_the_same_reply_after_reset(term, run_dir, tmp_path):
    t = term("chat", "--run", run_dir, "--max-new-tokens", "40")  # sampling at 0.8 by default
    assert "temperature = 0.0" in t.line("/temperature 0")
    first = t.line("where is the dog?")
    assert "forgotten" in t.line("/reset")
    second = t.line("where is the dog?")
    assert first == second and first.strip()
    t.line(f"/save {tmp_path / 'after-reset.txt'}")
    # /reset forgot the first exchange: the transcript holds the second one only.
    assert (tmp_path / "after-reset.txt").read_text() == f"User: where is the dog?\nAssistant: {second}\n"


def test_bad_commands_and_values_are_one_line_and_the_loop_goes_on(term, run_dir):
    t = term("chat", "--run", run_dir, "--max-new-tokens", "10")
    for line, message in [("/top_k abc", "/top_k takes an integer, got 'abc'"),
                          ("/top_p 2", "/top_p must be in (0, 1], got 2.0"),
                          ("/temperature -1", "/temperature must not be negative"),
                          ("/foo", "unknown command '/foo'"),
                          ("where is the ~?", "'~' (U+007E) is not in this model's character vocabulary")]:
        out = t.line(line)
        assert "\n" not in out and message in out, (line, out)
    assert "top_k = 200" in t.line("/top_k")  # the bad values changed nothing
    assert t.line("where is the fox?").strip()  # and the model still answers
    t.send("/quit\r")
    assert t.exit_code() == 0


def test_save_writes_the_transcript_and_never_overwrites_a_file(term, run_dir, tmp_path):
    t = term("chat", "--run", run_dir, "--max-new-tokens", "30", "--temperature", "0", "--system", "the cats")
    reply = t.line("where is the cat?")
    saved = tmp_path / "chat.txt"
    assert "saved" in t.line(f"/save {saved}")
    assert saved.read_text() == f"the cats\n\nUser: where is the cat?\nAssistant: {reply}\n"
    mine = tmp_path / "mine.txt"
    mine.write_text("not slmkit's")
    for existing, before in [(saved, saved.read_text()), (mine, "not slmkit's")]:
        out = t.line(f"/save {existing}")
        assert "\n" not in out and "exists" in out and existing.read_text() == before
    t.send("/quit\r")
    assert t.exit_code() == 0


def test_ctrl_c_stops_a_long_reply_keeps_it_and_the_program_goes_on(term, run_dir, tmp_path):
    t = term("generate", "--interactive", "--run", run_dir, "--max-new-tokens", "100000")
    t.send("the cat\r")
    t.expect(r"the cat\n(.|\n){300}")  # the reply is streaming: 300 characters are out, of 100,000
    t.send("\x03")
    t.expect(r"stopped.*" + re.escape(PROMPT))
    assert t.proc.poll() is None  # still running, at the prompt
    t.line(f"/save {tmp_path / 'partial.txt'}")
    partial = (tmp_path / "partial.txt").read_text()
    assert partial.startswith("the cat") and 300 < len(partial) < 100_000  # the part written was kept
    t.send("/quit\r")
    assert t.exit_code() == 0


def test_ctrl_c_at_the_prompt_clears_the_line(term, run_dir):
    t = term("chat", "--run", run_dir, "--max-new-tokens", "10")
    t.send("/foo")
    t.expect("/foo")  # echoed: the line is being edited
    # CPython's readline runs signal handlers only when its select() is interrupted: a Ctrl-C that
    # lands while it is still drawing the echo waits for the next one (or for Enter). A person is
    # never that fast; the test waits a moment, and presses Ctrl-C again if that was not enough.
    for attempt in range(3):
        time.sleep(0.5)
        t.send("\x03")
        try:
            t.expect(r"/quit or Ctrl-D leaves.*" + re.escape(PROMPT), timeout=10)
            break
        except AssertionError:
            if attempt == 2:
                raise
    t.send("/quit\r")  # had "/foo" stayed, the line would be "/foo/quit", an unknown command
    assert t.exit_code() == 0


def test_ctrl_d_leaves_with_exit_code_0(term, run_dir):
    t = term("generate", "--interactive", "--run", run_dir, "--max-new-tokens", "10")
    t.send("\x04")
    assert t.exit_code() == 0


def test_generate_interactive_continues_the_running_text(term, run_dir, tmp_path):
    t = term("generate", "--interactive", "--run", run_dir, "--max-new-tokens", "20", "--temperature", "0")
    first = t.line("where is the bird?")
    second = t.line("the fox")
    text = "where is the bird?"
    assert first == greedy(run_dir, text, 20)
    text += first + "\nthe fox"  # each input goes on a new line of the text so far, which is continued
    assert second == greedy(run_dir, text, 20)
    t.line(f"/save {tmp_path / 'text.txt'}")
    assert (tmp_path / "text.txt").read_text() == text + second + "\n"


def test_piped_input_is_read_line_by_line_until_its_end(run_dir):
    argv = ["chat", "--run", str(run_dir), "--max-new-tokens", "20", "--temperature", "0", *PRECISION]
    proc = subprocess.run([sys.executable, "-m", "slmkit", *argv], input="where is the cat?\n/top_k abc\nwhere is "
                          "the dog?\n", capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr  # the end of the input ends the loop: no /quit needed
    replies = proc.stdout.split("\n")
    assert len(replies) == 3 and replies[2] == "" and replies[0] == chat_reply(run_dir, "where is the cat?", 20)
    assert "/help" in proc.stderr and "/top_k takes an integer" in proc.stderr and ">" not in proc.stdout


def test_loop_settings_that_cannot_work_fail_before_the_model_loads(tmp_path, capsys):
    from conftest import cli_fails

    cli_fails(["chat", "--run", tmp_path / "missing", "--num-samples", "2"], capsys, "one reply at a time")
    cli_fails(["generate", "--interactive", "--run", tmp_path / "missing", "--prompt", "x"], capsys,
              "leave out --prompt")
    cli_fails(["chat", "--run", tmp_path / "missing", "--top-p", "2"], capsys, "--top-p must be in")

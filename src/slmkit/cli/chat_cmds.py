"""`slm chat` and `slm generate --interactive`: a trained model in an interactive terminal loop.

One loop serves both. `slm chat` keeps a list of messages and frames them with the plain-text chat
template of slmkit.chat (a reply ends where the model starts the user's next turn); `slm generate
--interactive` keeps one running text, to which each input is appended and which is then continued.
Either way the whole conversation is the prompt of each reply, and generation keeps only its last
block_size tokens (slmkit.generate slides the window).

Replies stream to stdout; the banner and every message go to stderr, so `printf ... | slm chat`
prints the replies only. Lines typed at a terminal get readline's line editing and an in-memory
history (no history file is written); piped input is read line by line until its end. Ctrl-C stops
a reply (the part written stays in the conversation) or clears the line being typed; SIGTERM still
ends the program (slmkit.entry turns it into a plain KeyboardInterrupt, which the loop lets through).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slmkit.chat import SPEAKERS, TURN_STOPS, render_chat
from slmkit.cli.flags import Parser, add_dataclass_flags, runtime
from slmkit.cli.generate_cmds import GENERATION, _load, _model_flags, generation_config
from slmkit.errors import UserError, show

if TYPE_CHECKING:  # both import torch: the CLI imports this module at start-up
    from slmkit.api import LanguageModel
    from slmkit.generate import GenerationConfig

PROMPT = "> "
CUE = f"{SPEAKERS['assistant']}:"  # render_chat ends with it: the cue for the next reply

HELP = """\
commands (any other line is a prompt):
  /temperature T   softmax temperature (0 = greedy)
  /top_k K         sample among the K most likely tokens (0 = off)
  /top_p P         nucleus sampling, 0 < P <= 1 (1 = off)
  /max_tokens N    tokens per reply at most
  /seed N          random seed of every reply (/seed none: a fresh draw each time)
  /reset           forget the conversation
  /save FILE       write the transcript to a new file
  /help            this list
  /quit            leave (so does Ctrl-D); Ctrl-C stops a reply, or clears the line being typed
a setting without a value shows the current one"""


def _seed(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


# /command -> (GenerationConfig field, parser of the value, what the value must be)
SETTINGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "temperature": ("temperature", float, "a number"),
    "top_k": ("top_k", int, "an integer"),
    "top_p": ("top_p", float, "a number"),
    "max_tokens": ("max_new_tokens", int, "an integer"),
    "seed": ("seed", _seed, "an integer or none"),
}


def note(message: str) -> None:
    """A message for the person at the terminal: stderr, so stdout holds the replies only."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the two conversations


class Conversation(Protocol):
    kind: str  # for the banner
    stops: tuple[str, ...]  # stop strings beyond the --stop flags
    strip_leading: bool  # whether a reply is shown without its leading whitespace

    def prompt(self, line: str) -> str | None: ...  # the prompt `line` makes, not yet kept; None: nothing to do
    def add(self, line: str, reply: str) -> None: ...
    def reset(self) -> None: ...
    def transcript(self) -> str: ...


class Chat:
    """`slm chat`: a list of messages in slmkit.chat's template; a reply ends at the next "User:" turn."""

    kind = "chat (the plain-text template of slmkit.chat)"
    stops = TURN_STOPS
    strip_leading = True  # the template writes "Assistant: reply": the space is the template's, not the reply's

    def __init__(self, system: str = ""):
        self.opening = [{"role": "system", "content": system}] if system.strip() else []
        self.messages = list(self.opening)

    def prompt(self, line: str) -> str | None:
        if not line.strip():
            return None  # an empty message asks nothing
        return render_chat([*self.messages, {"role": "user", "content": line}])

    def add(self, line: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply.lstrip()}]

    def reset(self) -> None:
        self.messages = list(self.opening)  # the system message opens every conversation

    def transcript(self) -> str:
        # The conversation as the model reads it, without the cue for a reply nobody asked for yet.
        return render_chat(self.messages).removesuffix(CUE) if self.messages else ""


class Text:
    """`slm generate --interactive`: one running text; each input goes on a new line and is continued."""

    kind = "plain continuation of everything typed and generated"
    stops: tuple[str, ...] = ()
    strip_leading = False

    def __init__(self) -> None:
        self.text = ""

    def prompt(self, line: str) -> str | None:
        if not line:
            return self.text or None  # Enter alone continues the text so far
        sep = "\n" if self.text and not self.text.endswith("\n") else ""
        return self.text + sep + line

    def add(self, line: str, reply: str) -> None:
        self.text = (self.prompt(line) or "") + reply

    def reset(self) -> None:
        self.text = ""

    def transcript(self) -> str:
        return self.text if not self.text or self.text.endswith("\n") else self.text + "\n"


# ----------------------------------------------------------------------------- Ctrl-C


class CtrlC(KeyboardInterrupt):
    """Ctrl-C inside the loop. A KeyboardInterrupt, so cleanup written for one still runs; the loop
    catches only this subclass, so SIGTERM (a plain KeyboardInterrupt) still ends the program."""


class Interrupts:
    """SIGINT while the loop runs. During a reply the first Ctrl-C only raises a flag that the stream
    checks between pieces, so the reply so far stays whole; anywhere else (the prompt, a second
    Ctrl-C) it raises CtrlC, which makes input() drop the line being typed."""

    def __init__(self) -> None:
        self.replying = False
        self.stopped = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.replying and not self.stopped:
            self.stopped = True
            return
        raise CtrlC

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread: Ctrl-C keeps its default there
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def reply(self) -> Iterator[None]:
        self.replying, self.stopped = True, False
        try:
            yield
        finally:
            self.replying = False


# ----------------------------------------------------------------------------- the loop


class Session:
    """The model, the sampling settings the commands change, and the conversation."""

    def __init__(self, lm: LanguageModel, gen: GenerationConfig, conv: Conversation):
        self.lm, self.gen, self.conv = lm, gen, conv
        self.interrupts = Interrupts()

    def handle(self, line: str) -> bool:
        """One line: a command or a prompt. False when the loop should end."""
        if line.startswith("/"):
            return self.command(line)
        prompt = self.conv.prompt(line)
        if prompt is not None:
            ids = self.lm.tokenizer.encode(prompt)  # UserError for characters outside the vocabulary
            self.conv.add(line, self.stream(ids))
        return True

    def stream(self, ids: list[int]) -> str:
        """Generate a reply to `ids`, writing it as it comes; the reply (all of it, or up to Ctrl-C)."""
        from slmkit.generate import generate_stream

        gen = replace(self.gen, stop=self.gen.stop + self.conv.stops)
        pieces: list[str] = []
        started = not self.conv.strip_leading  # shown from its first non-blank character when stripped
        stream = generate_stream(self.lm.model, self.lm.tokenizer, gen=gen, device=self.lm.device,
                                 dtype=self.lm.dtype, prompt_ids=ids)
        with self.interrupts.reply(), closing(stream):
            try:
                for piece in stream:
                    if self.interrupts.stopped:
                        break
                    shown = piece if started else piece.lstrip()
                    started = started or bool(shown)
                    sys.stdout.write(shown)
                    sys.stdout.flush()  # each piece as soon as it exists: that is the point of streaming
                    pieces.append(piece)
            except CtrlC:
                pass  # a second Ctrl-C while the stream was busy: the reply ends here
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.interrupts.stopped:
            note("(stopped; the reply so far stays in the conversation)")
        return "".join(pieces)

    def command(self, line: str) -> bool:
        parts = line[1:].split(maxsplit=1)
        name = parts[0].lower().replace("-", "_") if parts else ""
        arg = parts[1].strip() if len(parts) > 1 else ""
        if name in ("quit", "exit"):
            return False
        if name in SETTINGS:
            self.setting(name, arg)
        elif name == "reset":
            self.conv.reset()
            note("(the conversation is forgotten)")
        elif name == "save":
            self.save(arg)
        elif name == "help":
            note(HELP)
        else:
            raise UserError(f"unknown command {show(line.split()[0])}; /help lists the commands")
        return True

    def setting(self, name: str, arg: str) -> None:
        field, parse, kind = SETTINGS[name]
        if arg:
            try:
                value = parse(arg)
            except ValueError:
                raise UserError(f"/{name} takes {kind}, got {show(arg)}") from None
            gen = replace(self.gen, **{field: value})
            try:
                gen.validate()  # the checks of the --flags, whose names the messages carry
            except UserError as exc:
                raise UserError(str(exc).replace("--" + field.replace("_", "-"), "/" + name)) from None
            self.gen = gen
        note(f"{name} = {getattr(self.gen, field)}")

    def save(self, arg: str) -> None:
        from slmkit.fileio import atomic_write_text

        if not arg:
            raise UserError("/save needs a file name")
        text = self.conv.transcript()
        if not text:
            raise UserError("nothing to save yet")
        path = Path(arg).expanduser()
        # Only ever a new file: one already there (or a link) may be something slmkit did not write.
        if os.path.lexists(path):
            raise UserError(f"{path} exists; /save writes only new files")
        atomic_write_text(path, text)
        note(f"(saved the transcript to {path})")


def _enable_line_editing() -> None:
    """With readline imported, input() edits the line and keeps a history of this session in memory.
    Nothing here reads or writes a history file (only Python's own interactive prompt does)."""
    try:
        import readline  # noqa: F401
    except ImportError:  # a Python built without it: plain input() still works
        pass


def _ask(tty: bool) -> str:
    if not tty:
        return input()  # piped: no prompt, line by line
    if sys.stdout.isatty():
        return input(PROMPT)  # readline draws the prompt, and redraws it while the line is edited
    sys.stderr.write(PROMPT)  # replies go to a file: the prompt is not part of them
    sys.stderr.flush()
    return input()


def read_line(tty: bool) -> str | None:
    """The next line typed or piped; None at the end of the input (Ctrl-D)."""
    while True:
        try:
            return _ask(tty).rstrip("\r")
        except EOFError:
            if tty:
                sys.stderr.write("\n")  # the shell's prompt then starts on a line of its own
            return None
        # CPython's readline runs signal handlers only when a Ctrl-C interrupts its wait for a key: one
        # that lands in the microseconds it spends drawing a key is handled at Enter, dropping that line.
        except CtrlC:
            note("\n(Ctrl-C clears the line; /quit or Ctrl-D leaves)")


def _turn(session: Session, line: str) -> bool:
    """One line handled; a mistake or a Ctrl-C is one message, and the loop goes on."""
    from slmkit.cli import one_line  # the package imports this module: not at its top

    try:
        return session.handle(line)
    except UserError as exc:
        note(one_line(str(exc)))
    except CtrlC:
        note("(interrupted)")
    return True


def run_loop(lm: LanguageModel, gen: GenerationConfig, conv: Conversation, title: str) -> None:
    """Read lines until /quit or the end of the input, answering each prompt."""
    tty = sys.stdin.isatty()
    if tty:
        _enable_line_editing()
    note(f"{title}: {lm.model.num_params() / 1e6:.2f}M parameters, {conv.kind}. "
         f"/help lists the commands; /quit or Ctrl-D leaves.")
    session = Session(lm, gen, conv)
    with session.interrupts.installed():
        while (line := read_line(tty)) is not None:
            if not _turn(session, line):
                return


# ----------------------------------------------------------------------------- commands


def _loop_config(args: argparse.Namespace) -> GenerationConfig:
    """The sampling settings, checked before the model loads."""
    gen = generation_config(args, runtime(args, "weights"))
    if gen.num_samples != 1:
        raise UserError("the interactive loop writes one reply at a time: leave out --num-samples")
    return gen


def cmd_chat(args: argparse.Namespace) -> None:
    gen = _loop_config(args)
    lm = _load(args)
    if args.system:
        lm.tokenizer.encode(args.system)  # a system message the vocabulary cannot write fails now, not every turn
    run_loop(lm, gen, Chat(args.system), args.run)


def cmd_generate_interactive(args: argparse.Namespace) -> None:
    """`slm generate --interactive`: the prompts come from the loop, one line at a time."""
    if args.prompt or args.prompt_file:
        raise UserError("--interactive reads its prompts from the terminal: leave out --prompt and --prompt-file")
    gen = _loop_config(args)
    run_loop(_load(args), gen, Text(), args.run)


def _build_chat(p: Parser) -> None:
    from slmkit.generate import GenerationConfig  # imports torch: only when this command is used

    _model_flags(p)
    p.add_argument("--system", default="", help="a system message that opens the conversation")
    add_dataclass_flags(p, GenerationConfig, GENERATION,
                        "sampling (slm generate's defaults; /temperature, /top_k, ... change them in the loop)")
    p.set_defaults(func=cmd_chat)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "chat", build=_build_chat, help="talk with a model in the terminal (a plain-text chat template)",
        description="An interactive loop: each line typed is a user message; the model's reply streams to stdout. "
                    "The conversation is framed with slmkit.chat's plain-text template (User: / Assistant:) and "
                    "kept as context. Commands: /temperature, /top_k, /top_p, /max_tokens, /seed, /reset, "
                    "/save FILE, /help, /quit (or Ctrl-D); Ctrl-C stops a reply. Piped input is read line by line.",
    )

"""`slm serve`: the OpenAI-compatible API through the official `openai` client and raw HTTP, the
batching engine (greedy answers do not depend on the company a sequence decodes in), limits,
errors, disconnects."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed (test extra)")

from conftest import REPO, cli_fails  # noqa: E402
from serve_helpers import serve, train_tiny_run  # noqa: E402

import slmkit  # noqa: E402
from slmkit.generate import GenerationConfig, generate_ids  # noqa: E402
from slmkit.serve.engine import EngineLoop, Finished, Sequence, Token  # noqa: E402

KEY = "test-key"
MODEL = "tiny-shakespeare"
PROMPTS = ["the cat", "the dog sat on", "the bird sat on the h", "number 3.\nthe fox", "the", "the fox sat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def lm(run):
    return slmkit.load(run, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    # float32 so that answers can be compared with `slm generate`'s to the token; a token limit past
    # the context so that sequences slide their window.
    with serve(run, args=("--dtype", "float32", "--max-tokens-limit", "100000"),
               log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(lm, prompt: str, n: int) -> str:
    return lm.generate(prompt, max_new_tokens=n, temperature=0, top_k=0)[0]


# ------------------------------------------------------------------ the openai client


def test_completion_with_the_openai_client_is_slm_generates_greedy_answer(client, lm):
    out = client.completions.create(model=MODEL, prompt="the cat", max_tokens=90, temperature=0)
    choice = out.choices[0]
    assert choice.text == greedy(lm, "the cat", 90)  # 97 tokens: past the 64-token context, so it slid
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 90 and out.usage.total_tokens == 97
    assert out.model == MODEL and out.object == "text_completion"


def test_streamed_completion_arrives_in_pieces_that_add_up_and_end_with_a_finish_reason(client, lm):
    chunks = list(client.completions.create(model=MODEL, prompt="the dog", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == greedy(lm, "the dog", 40)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 40 and not chunks[-1].choices


def test_stop_strings_cut_the_text_and_say_stop(client):
    out = client.completions.create(model=MODEL, prompt="the cat sat on the mat number 1.\n", max_tokens=200,
                                    temperature=0, stop=[" on", "."])
    assert out.choices[0].finish_reason == "stop"
    assert " on" not in out.choices[0].text and "." not in out.choices[0].text
    assert out.usage.completion_tokens < 200


def test_chat_renders_the_template_and_stops_at_the_next_turn(client, lm):
    messages = [{"role": "system", "content": "A farm."}, {"role": "user", "content": "the cat"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0)
    reply = out.choices[0].message
    assert reply.role == "assistant" and isinstance(reply.content, str)
    expected = greedy(lm, "A farm.\n\nUser: the cat\nAssistant:", 60).split("\nUser:")[0].lstrip()
    assert reply.content == expected
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                              stream=True)
    pieces = list(streamed)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == expected


def test_n_choices_with_a_seed_are_slm_generates_samples(client, lm):
    kw = dict(model=MODEL, prompt="the fox", max_tokens=30, temperature=1.0, n=3, seed=7)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
    # Choice j draws with seed + j, as `slm generate --seed 7 --num-samples 3` does.
    assert texts == lm.generate("the fox", max_new_tokens=30, temperature=1.0, top_k=0, seed=7, num_samples=3)


def test_logprobs_are_the_models_and_add_up_to_the_text(client, lm):
    out = client.completions.create(model=MODEL, prompt="the bird", max_tokens=12, temperature=0.9, seed=1,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == list(range(12))  # one character per token
    assert all(len(top) == 3 and max(top.values()) >= lp.token_logprobs[i] - 1e-6
               for i, top in enumerate(lp.top_logprobs))
    # The same numbers as scoring the text: log-softmax of the model's logits, before temperature.
    _, ids, scored = lm.score_text("the bird" + out.choices[0].text)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), torch.tensor(scored[-12:], dtype=torch.float32),
                               atol=1e-4, rtol=0)


def test_echo_with_logprobs_scores_the_prompt_too(client):
    out = client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=5, temperature=0, echo=True,
                                    logprobs=0)
    choice = out.choices[0]
    assert choice.text.startswith("the cat sat") and len(choice.text) == len("the cat sat") + 5
    assert choice.logprobs.tokens[:11] == list("the cat sat")
    assert choice.logprobs.token_logprobs[0] is None and all(x < 0 for x in choice.logprobs.token_logprobs[1:])


def test_a_list_of_prompts_gives_a_choice_each_in_order(client, lm):
    out = client.completions.create(model=MODEL, prompt=["the cat", "the dog"], max_tokens=10, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [greedy(lm, "the cat", 10), greedy(lm, "the dog", 10)]


def test_models_and_health(client, server, lm):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.context_length == 64 and card.parameters == lm.model.num_params()
    assert server.health()["status"] == "ok"


def test_errors_come_in_openais_shape_through_the_client(client):
    cases = [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=100001), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(prompt="the " * 20), "prompt"),  # 80 characters: the context is 64
        (dict(prompt="the cat Ω"), "prompt"),  # not in the character vocabulary
        (dict(n=0), "n"),
        (dict(logprobs=99), "logprobs"),
        (dict(extra_body={"top_k": "many"}), "top_k"),
        (dict(extra_body={"max_token": 5}), "max_token"),
    ]
    for change, param in cases:
        kw = dict(model=MODEL, prompt="the cat", max_tokens=5) | change
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**kw)
        assert err.value.status_code == 400
        assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="the " * 20, max_tokens=5)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="the cat", max_tokens=5)
    assert MODEL in err.value.message


def post(server, body: bytes | dict, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base}{path}", content=content, timeout=30, headers={"Content-Type": "application/json"})


def test_malformed_bodies_are_400_and_oversized_ones_413(server):
    for body in (b"{bad", b"[1, 2]", b'{"prompt": "the", "max_tokens": NaN}', b'{"prompt": 5}',
                 b'{"messages": "hi"}', b'{"prompt": "the", "stream": "yes"}', b"\xff\xfe"):
        r = post(server, body)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post(server, {"messages": [{"role": "wizard", "content": "hi"}]}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = post(server, {"prompt": "the " * 400_000})
    assert r.status_code == 413
    r = httpx.get(f"{server.base}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert server.proc.poll() is None  # none of it hurt the server


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 100000, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert server.running() == 1
    for _ in range(100):  # the engine sees the cancellation at its next token boundary
        if server.running() == 0:
            break
        threading.Event().wait(0.05)
    assert server.running() == 0


def test_concurrent_requests_decode_together_and_get_their_alone_answers(client, server, lm):
    before = server.health()["models"][MODEL]
    alone = {p: greedy(lm, p, 60) for p in PROMPTS}

    def ask(prompt: str) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        answers = list(pool.map(ask, PROMPTS * 2))
    assert answers == [alone[p] for p in PROMPTS * 2]
    after = server.health()["models"][MODEL]
    steps = after["steps"] - before["steps"]
    rows = after["rows_fed"] - before["rows_fed"]
    assert rows / steps > 2  # they really were batched: on average more than two sequences per step


def test_api_key_beyond_max_concurrency_429_and_several_runs_picked_by_name(run, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    args = ("--max-concurrency", "1", "--max-batch", "1", "--max-tokens-limit", "100000", "--api-key", KEY)
    with serve(run, twin, args=args, log_dir=tmp_path) as s:
        bad = openai.OpenAI(base_url=f"{s.base}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="the", max_tokens=2)
        r = httpx.post(f"{s.base}/v1/completions", json={"prompt": "the", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        c = openai.OpenAI(base_url=f"{s.base}/v1", api_key=KEY, max_retries=0)
        assert sorted(m.id for m in c.models.list().data) == [MODEL, "twin"]
        assert c.completions.create(model="twin", prompt="the", max_tokens=3).model == "twin"
        with pytest.raises(openai.BadRequestError):  # two models: the request must say which
            c.completions.create(model="", prompt="the", max_tokens=3)
        with httpx.stream("POST", f"{s.base}/v1/completions", timeout=30, headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "twin", "prompt": "the", "max_tokens": 100000, "stream": True}) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the response
            next(lines)
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model=MODEL, prompt="the", max_tokens=3)
        for _ in range(100):
            if s.running() == 0 and s.health()["in_flight"] == 0:
                break
            threading.Event().wait(0.05)
        assert c.completions.create(model=MODEL, prompt="the", max_tokens=3).choices[0].text


# ------------------------------------------------------------------ the engine alone


def test_the_engine_batches_sequences_that_join_at_different_times_and_slide(lm):
    """Sequences of different lengths join mid-decode, slide past the context, finish at different
    times; each gets the tokens generate_ids gives it alone."""
    events: dict[int, list] = {}
    done = threading.Event()

    def deliver(batch):
        for seq, event in batch:
            events.setdefault(seq.tag, []).append(event)
        if sum(isinstance(e, Finished) for evs in events.values() for e in evs) == len(PROMPTS):
            done.set()

    loop = EngineLoop()
    engine = loop.engine(lm.model, torch.device("cpu"), torch.float32, "auto", None, lm.tokenizer.vocab_size, 4,
                         deliver)
    thread = loop.run_in_thread()
    try:
        lengths = [70, 15, 90, 40, 5, 55]
        for tag, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
            gen = GenerationConfig(max_new_tokens=n, temperature=0, top_k=0)
            engine.submit(Sequence(lm.tokenizer.encode(prompt), gen, tag=tag))
        assert done.wait(60)
    finally:
        loop.stop()
        thread.join(10)
    for tag, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        got = [e.id for e in events[tag] if isinstance(e, Token)]
        gen = GenerationConfig(max_new_tokens=n, temperature=0, top_k=0)
        assert got == list(generate_ids(lm.model, lm.tokenizer.encode(prompt), gen, "cpu"))
        assert events[tag][-1] == Finished("length")
    assert engine.rows_fed / engine.steps > 2


# ------------------------------------------------------------------ the command line


def test_serve_refuses_bad_settings_in_one_line(run, capsys):
    cli_fails(["serve", "--run", str(run), "--max-batch", "0"], capsys, match="--max-batch")
    cli_fails(["serve", "--run", str(run), "--port", "70000"], capsys, match="--port")
    cli_fails(["serve", "--run", str(run / "missing")], capsys)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cli_fails(["serve", "--run", str(run), "--port", str(port)], capsys, match="cannot listen")


def test_serve_without_the_extra_says_how_to_install_it(run, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    cli_fails(["serve", "--run", str(run)], capsys, match=r"pip install -e \"\.\[serve\]\"")


# ------------------------------------------------------------------ the README's examples


def readme_serve_section() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("### The OpenAI-compatible server"):text.index("### The web playground")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_the_readmes_curl_examples_work(server):
    block = re.search(r"```bash\n(curl .*?)```", readme_serve_section(), flags=re.S).group(1)
    script = block.replace("http://127.0.0.1:8000", server.base)
    out = subprocess.run(["bash", "-c", "set -e\n" + script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"finish_reason"' in out.stdout and "data: [DONE]" in out.stdout and '"error"' not in out.stdout


def test_the_readmes_python_example_works(server):
    code = re.search(r"```python\n(from openai import OpenAI.*?)```", readme_serve_section(), flags=re.S).group(1)
    code = code.replace("http://127.0.0.1:8000", server.base)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "CompletionUsage" in out.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_server_cleanly_mid_stream(run, tmp_path, sig):
    with serve(run, args=("--max-tokens-limit", "100000"), log_dir=tmp_path) as s:
        body = {"prompt": "the", "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", f"{s.base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(sig)
            assert s.proc.wait(timeout=20) == 0
    log = s.log.read_text()
    assert "Traceback" not in log and log.splitlines()[-1] == "stopping"

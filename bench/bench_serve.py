"""`slm serve` under load, on 127.0.0.1 only (JSON on stdout, progress on stderr).

    python bench/bench_serve.py --run runs/sc300                 # throughput, batching on vs off
    python bench/bench_serve.py --run runs/sc300 --soak 120      # 2 minutes of mixed traffic

Throughput: a server with continuous batching (--max-batch 16) and the same server with it off
(--max-batch 1) each get `--clients` concurrent streaming clients asking, one request after
another, for --max-tokens tokens after a --prompt-tokens prompt, for --seconds. Reported: total
completion tokens per second (counted by the server's usage chunk), and time to first token
(request sent -> first text chunk) p50 / p99; and, against this machine's peaks measured in the
same run (`peaks`), the decoding model FLOP/s (model_tflops, of_gemm_peak) and the weights read per
token as GB/s and a share of the copy bandwidth (weight_gb_s, of_copy_bandwidth: with batching one
read of the weights serves several tokens, so this share can pass 1). Before that, `--agree` greedy
prompts are answered one at a time and then all together: how many answers are identical.

Soak: `--clients` workers send a mix of streaming, non-streaming, chat and malformed requests for
--soak seconds. Every answer is checked: no 5xx, every stream ends with [DONE] and a finish
reason, every bad request gets its 4xx; the server's resident memory is sampled each second, and
its value after the first minute (warm-up) is compared with its value at the end.

The load generator is an asyncio httpx client in this process; it shares the machine's cores with
the server, as a local user's client would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _common import cpu_model, decoding_context, decoding_rates, emit, machine_peaks

from slmkit.checkpoint import find_checkpoint, load_checkpoint
from slmkit.runtime import resolve_device, resolve_dtype

SHAKESPEARE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Server:
    """`slm serve` in a subprocess on a free port."""

    def __init__(self, run: str, *flags: str):
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{os.getpid()}-{time.monotonic_ns()}.err"
        argv = [sys.executable, "-m", "slmkit", "serve", "--run", run, "--port", "0", "--max-tokens-limit",
                "100000", *flags]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", self.log.read_text())
            if found:
                self.base = found.group(1)
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"slm serve failed: {self.log.read_text()}")
            time.sleep(0.2)
        raise SystemExit("slm serve did not start")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def prompt_of(tokens: int, index: int) -> str:
    """A character prompt of `tokens` characters, different per index."""
    start = (index * 37) % (len(SHAKESPEARE) - tokens)
    return SHAKESPEARE[start : start + tokens]


async def stream_once(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float | None, int, bool]:
    """(seconds to the first text, completion tokens, ended with [DONE]) of one streamed request."""
    sent = time.perf_counter()
    first, tokens, done = None, 0, False
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            # Only the first text chunk and the usage chunk are parsed: the load generator shares
            # the cores with the server, so it does as little as it can.
            if first is None:
                chunk = json.loads(data)
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - sent
            if '"usage"' in data:
                tokens = json.loads(data)["usage"]["completion_tokens"]
    return first, tokens, done


async def throughput(base: str, clients: int, seconds: float, prompt_tokens: int, max_tokens: int) -> dict:
    ttft: list[float] = []
    totals = [0] * clients
    stop_at = time.perf_counter() + seconds

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            body = {"prompt": prompt_of(prompt_tokens, i * 1000 + n), "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": n, "stream": True, "stream_options": {"include_usage": True}}
            first, tokens, done = await stream_once(client, base, body)
            if not done:
                raise RuntimeError("a stream ended without [DONE]")
            ttft.append(first)
            totals[i] += tokens
            n += 1

    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
        elapsed = time.perf_counter() - started
    ttft.sort()
    return {"tokens_per_s": round(sum(totals) / elapsed, 1), "requests": len(ttft),
            "ttft_ms_p50": round(1000 * statistics.median(ttft), 1),
            "ttft_ms_p99": round(1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1),
            "ttft_ms_max": round(1000 * ttft[-1], 1), "seconds": round(elapsed, 1)}


async def agreement(base: str, prompts: int, max_tokens: int) -> dict:
    """Greedy answers alone, then all at once: how many are the same."""

    async def ask(client: httpx.AsyncClient, i: int) -> str:
        body = {"prompt": prompt_of(32, i), "max_tokens": max_tokens, "temperature": 0}
        r = await client.post(f"{base}/v1/completions", json=body)
        return r.json()["choices"][0]["text"]

    async with httpx.AsyncClient(timeout=300) as client:
        alone = [await ask(client, i) for i in range(prompts)]
        together = await asyncio.gather(*(ask(client, i) for i in range(prompts)))
    differ = [next(i for i, (x, y) in enumerate(zip(a + "\0", b + "\1", strict=False)) if x != y)
              for a, b in zip(alone, together, strict=True) if a != b]
    return {"greedy_prompts": prompts, "identical_alone_and_batched": prompts - len(differ),
            "first_difference_at_token": differ}


BAD_REQUESTS = [
    (b"{not json", 400), (b'{"prompt": "x", "max_tokens": 0}', 400), (b'{"prompt": "x", "temperature": -1}', 400),
    (b'{"prompt": "x", "top_p": 0}', 400), (b'{"prompt": "x", "model": "nope"}', 404),
    (b'{"prompt": "\\u03a9\\u03a9", "max_tokens": 5}', 400), (b'{"prompt": 7}', 400),
    (json.dumps({"prompt": "x" * 5000, "max_tokens": 5}).encode(), 400),
]


async def soak(server: Server, clients: int, seconds: float) -> dict:
    base = server.base
    counts = {"stream": 0, "plain": 0, "chat": 0, "bad": 0}
    problems: list[str] = []
    status_5xx = 0
    rss: list[tuple[float, float]] = []
    started = time.perf_counter()
    stop_at = started + seconds

    async def one(client: httpx.AsyncClient, rng: random.Random) -> None:
        nonlocal status_5xx
        kind = rng.choices(["stream", "plain", "chat", "bad"], weights=[5, 2, 1, 2])[0]
        counts[kind] += 1
        max_tokens = rng.randint(1, 200)
        if kind == "stream":
            body = {"prompt": prompt_of(rng.randint(1, 64), rng.randint(0, 999)), "max_tokens": max_tokens,
                    "stream": True, "stream_options": {"include_usage": True}, "logprobs": rng.choice([None, 2])}
            _, tokens, done = await stream_once(client, base, body)
            if not done or not 1 <= tokens <= max_tokens:
                problems.append(f"stream: done={done} tokens={tokens} of {max_tokens}")
        elif kind in ("plain", "chat"):
            path, body = ("/v1/completions", {"prompt": prompt_of(20, rng.randint(0, 999)), "max_tokens": max_tokens})
            if kind == "chat":
                path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak."}],
                                                      "max_tokens": max_tokens}
            r = await client.post(f"{base}{path}", json=body)
            status_5xx += r.status_code >= 500
            choice = r.json()["choices"][0] if r.status_code == 200 else None
            if choice is None or choice["finish_reason"] not in ("stop", "length"):
                problems.append(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
        else:
            raw, expected = rng.choice(BAD_REQUESTS)
            r = await client.post(f"{base}/v1/completions", content=raw, headers={"Content-Type": "application/json"})
            status_5xx += r.status_code >= 500
            if r.status_code != expected or "error" not in r.json():
                problems.append(f"bad request {raw[:40]!r}: HTTP {r.status_code}, expected {expected}")

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.perf_counter() < stop_at:
            try:
                await one(client, rng)
            except Exception as exc:  # noqa: BLE001 - counted, not fatal: the soak must finish
                problems.append(f"{type(exc).__name__}: {exc}")

    async def sample_memory() -> None:
        while time.perf_counter() < stop_at:
            rss.append((time.perf_counter() - started, server.rss_mb()))
            await asyncio.sleep(1)

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(sample_memory(), *(worker(i, client) for i in range(clients)))
    # The first minute includes warm-up (the allocator growing to the working set); flat means the
    # memory at its end is the memory at the end of the run.
    minute = min(60.0, seconds / 2)
    after_first = [m for t, m in rss if t <= minute][-1]
    return {"seconds": seconds, "requests": counts, "status_5xx": status_5xx, "problems": len(problems),
            "first_problems": problems[:5], "rss_mb_after_first_minute": round(after_first, 1),
            "rss_mb_at_end": round(rss[-1][1], 1), "rss_mb_max": round(max(m for _, m in rss), 1),
            "rss_mb_every_20s": [round(m) for t, m in rss if int(t) % 20 == 0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run directory (e.g. shakespeare-char)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30, help="load per server in the throughput test")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--agree", type=int, default=16, help="greedy prompts compared alone and batched; 0 = skip")
    ap.add_argument("--soak", type=float, default=0, help="seconds of mixed traffic instead of the throughput test")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype")
    args = ap.parse_args()
    result = {"bench": "serve", "cpu": cpu_model(), "cores": os.cpu_count(), "run": args.run,
              "clients": args.clients, "dtype": args.dtype}
    if args.soak:
        server = Server(args.run, "--dtype", args.dtype)
        try:
            log(f"soak: {args.soak:.0f} s of mixed traffic from {args.clients} clients")
            result["soak"] = asyncio.run(soak(server, args.clients, args.soak))
        finally:
            server.stop()
        emit(result)
        return
    result.update(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)
    for name, flags in (("batching", ("--max-batch", "16")), ("no_batching", ("--max-batch", "1"))):
        server = Server(args.run, "--dtype", args.dtype, *flags)
        try:
            asyncio.run(throughput(server.base, 2, 3, args.prompt_tokens, 16))  # warm up
            if name == "batching" and args.agree:
                log(f"{name}: {args.agree} greedy prompts alone, then together")
                result["agreement"] = asyncio.run(agreement(server.base, args.agree, args.max_tokens))
            log(f"{name}: {args.clients} streaming clients for {args.seconds:.0f} s")
            result[name] = asyncio.run(throughput(server.base, args.clients, args.seconds, args.prompt_tokens,
                                                  args.max_tokens))
            log(f"  {result[name]}")
        finally:
            server.stop()
    # The server's device and dtype (no --device: auto); its weights are cast to that dtype for decoding.
    device = resolve_device("auto")
    dtype = resolve_dtype(args.dtype, device)
    model = load_checkpoint(find_checkpoint(args.run)).config.model
    context = decoding_context(args.prompt_tokens, args.max_tokens, model.block_size)  # requests run to max_tokens
    result["peaks"] = machine_peaks(device)  # with the servers stopped
    for name in ("batching", "no_batching"):
        result[name].update(decoding_rates(model, result[name]["tokens_per_s"], context, dtype,
                                           str(dtype).removeprefix("torch."), result["peaks"]))
    result["speedup"] = round(result["batching"]["tokens_per_s"] / result["no_batching"]["tokens_per_s"], 2)
    emit(result)


if __name__ == "__main__":
    main()

"""Random requests against a live ``engine.serve``: each gets a 200 or a 4xx / 503 in OpenAI's error
envelope, never a 5xx, while a long greedy stream started first ends normally (no request may cancel
another), and the server's log holds no traceback.

    PYTHONPATH=. python bench/fuzz_server.py --runs 300 --seed 1 [--model M] [--flag=--kv-cache=paged]

Each request is a valid chat or completion body with one to three fields set to values of every JSON
type, edge numbers (seeds past 64 bits, NaN, 2**63), strings with unpaired surrogates, odd messages
(roles, content parts), or a raw body that is not a JSON object. Prints the statuses seen, every
request that broke the rule, and the guard stream's end; exit status 1 if anything broke it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import tempfile
import threading
from collections import Counter
from pathlib import Path

from tools.serve_process import start_server

VALUES = [None, True, False, 0, 1, -1, 2, 1.5, -0.5, 1e300, float("nan"), "x", "", "0.5", [], [1], ["a"], {},
          {"a": 1}, 2**31, 2**63, -2**63, 2**64, 2**70, -2**64, 100000, [[1, 2]], "\u0000", "a\ud800b", "a" * 5000]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "n", "stream", "stream_options", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "logprobs", "top_logprobs", "echo", "response_format", "tools", "tool_choice",
          "parallel_tool_calls", "best_of", "logit_bias", "stop_token_ids"]
_F = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}
PLAUSIBLE = {  # values of each field's own type, edges included (half the picks): requests that get further
    "seed": [0, -1, 2**63, 2**64 - 1, 2**64, 2**70, -2**63 - 1], "temperature": [0, 0.7, 2, 1e-30],
    "top_p": [1, 0.5, 1e-30], "top_k": [-1, 0, 5, 10**9], "min_p": [0, 0.5, 0.999], "n": [1, 2, 4],
    "stop": ["\n", ["a", "b"], [""], "x" * 100], "prompt": ["hi", "a\ud800b", [1, 2, 3], [[1], [2]], ["a", "b"], ""],
    "max_tokens": [1, 4, 64], "stream": [True, False], "stream_options": [{"include_usage": True}],
    "presence_penalty": [-2, 0, 2], "frequency_penalty": [-2, 2], "repetition_penalty": [0.5, 2, 1e30],
    "logprobs": [True, 0, 5], "top_logprobs": [0, 5, 20], "max_completion_tokens": [1, 8],
    "tools": [[{"type": "function", "function": _F}], [{"type": "function"}], [{"type": "function", "function":
              {"name": "a b"}}], [{"type": "function", "function": {**_F, "parameters": []}}], [1]],
    "tool_choice": ["auto", "none", "required", {"type": "function", "function": {"name": "f"}}, {}],
    "parallel_tool_calls": [True, False],
    "stop_token_ids": [[1], [0, 2], [], [-1], [2**40], ["1"], [True], [1.5], 7, [1] * 1000],
    "logit_bias": [{"1": 100}, {"1": -100, "2": 5.5}, {"x": 1}, {"1": 1e9}, {"-1": 1}, {str(2**40): 1}, {" 3": 1}],
    "response_format": [{"type": "json_object"}, {"type": "json_schema"}, {"type": "text"}, {"type": 3},
                        {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties":
                         {"a": {"type": "integer"}, "b": {"enum": ["x", 1]}}, "required": ["a"]}}},
                        {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "a"}}},
                        {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/X"}}},
                        {"type": "json_schema", "json_schema": {"schema": {"type": "array", "maxItems": -1}}}],
}
RAW = [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b'{"prompt": "hi",}', b"1e999"]
ROLES = ["user", "system", "assistant", "tool", "developer", "bogus", 1, None]
CONTENTS = ["hi", "", None, 3, [], [{"type": "text", "text": "hi"}], [{"type": "image_url"}], {"a": 1}, "\udcff"]
CALLS = [[{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}}], [{"function": "f"}],
         [{"function": {"name": "f", "arguments": "{bad"}}], [1], 5, [{"function": {"name": 3}}], []]


def request(rng: random.Random) -> tuple[str, bytes, dict]:
    """(path, body, the body as sent, for the report)."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if rng.random() < 0.05:
        raw = rng.choice(RAW)
        return path, raw, {"raw": raw.decode("latin-1")}
    body: dict = {"model": "fuzz", "max_tokens": 4}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        body[field] = rng.choice(PLAUSIBLE[field] if field in PLAUSIBLE and rng.random() < 0.5 else VALUES)
        if field == "messages" and rng.random() < 0.6:
            body[field] = [{"role": rng.choice(ROLES), "content": rng.choice(CONTENTS)}]
            if rng.random() < 0.4:  # an assistant's calls and a tool's result
                body[field] += [{"role": "assistant", "content": None, "tool_calls": rng.choice(CALLS)},
                                {"role": "tool", "tool_call_id": rng.choice(["c", 3, None]), "content": "r"}]
    for field, most in (("max_tokens", 64), ("n", 4)):  # bounded work a request
        if isinstance(body.get(field), int) and body[field] > most:
            body[field] = most
    return path, json.dumps(body, allow_nan=True).encode(), body


def send(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def kept(status: int, out: bytes, body: dict) -> bool:
    """A 200 (a JSON object, or a stream ending with [DONE]) or a 4xx / 503 in OpenAI's envelope."""
    if status == 200:
        if body.get("stream") not in (None, False, 0):
            return out.rstrip().endswith(b"data: [DONE]")
        try:
            return isinstance(json.loads(out), dict)
        except ValueError:
            return False
    try:
        err = json.loads(out)["error"]
        return (400 <= status < 500 or status == 503) and isinstance(err["message"], str) and "type" in err
    except (ValueError, KeyError, TypeError):
        return False


def guard(url: str, result: list) -> None:
    """A long greedy stream: it must end with finish_reason "length" whatever the other requests do."""
    body = json.dumps({"model": "fuzz", "prompt": "x", "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                       "stream": True})
    status, out = send(url, "/v1/completions", body.encode())
    events = [json.loads(line[6:]) for line in out.decode().splitlines()
              if line.startswith("data: {")]
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    result.append((status, finishes[-1] if finishes else None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="default: the embedded tiny model")
    p.add_argument("--flag", action="append", default=[], help="a further engine.serve flag (--flag=--kv-cache=paged)")
    a = p.parse_args()
    log = Path(tempfile.mkdtemp(prefix="fuzz-server-")) / "server.log"
    flags = ["--max-batch", "8", "--generation-config", "openai", "--served-model-name", "fuzz",
             *(["--model", a.model] if a.model else []), *a.flag]
    proc, url = start_server(flags, timeout=300, log=log)
    try:
        rng, statuses, broken, guarded = random.Random(a.seed), Counter(), [], []
        g = threading.Thread(target=guard, args=(url, guarded))
        g.start()
        for _ in range(a.runs):
            path, raw, body = request(rng)
            status, out = send(url, path, raw)
            statuses[status] += 1
            if not kept(status, out, body):
                broken.append(f"{status} {path} {json.dumps(body, allow_nan=True)[:200]} -> {out[:200]!r}")
        g.join(600)
    finally:
        proc.terminate()
        proc.wait(60)
    tracebacks = log.read_text().count("Traceback")
    print(f"server: {a.runs} requests (seed {a.seed}), statuses {dict(sorted(statuses.items()))}, "
          f"{len(broken)} broke the rule; guard stream {guarded}; server log tracebacks: {tracebacks}")
    for line in broken:
        print("BROKE", line)
    return 1 if broken or tracebacks or guarded != [(200, "length")] else 0


if __name__ == "__main__":
    raise SystemExit(main())

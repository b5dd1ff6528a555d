"""The interactive chat: context shift, a message too long to fit, finish reasons, the empty reply,
and (on a pseudo-terminal) readline editing, history and Ctrl-C at the prompt."""

from __future__ import annotations

import io
import os
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

import engine.generate
from engine.chat import fit_context
from engine.generate import Generation
from engine.run import main
from engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu"]


def chars(messages: list[dict]) -> list[int]:
    """A fake encoder: one token per character of every message."""
    return [0] * sum(len(m["content"]) for m in messages)


def msgs(*contents: str, system: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    return out + [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


@pytest.mark.parametrize("contents,system,limit,reserve,left,dropped", [
    (("aaaa", "bbbb", "cc"), None, 20, 5, ["aaaa", "bbbb", "cc"], 0),  # fits
    (("aaaa", "bbbb", "cc"), None, 10, 5, ["cc"], 2),  # oldest user+assistant pair goes
    (("aaaa", "bbbb", "cccc", "dddd", "ee"), "S" * 3, 16, 2, ["SSS", "cccc", "dddd", "ee"], 2),  # system stays
    (("aaaa", "bbbb", "c" * 9), None, 10, 5, ["c" * 9], 2),  # alone it fits the context, not the reserve
])
def test_fit_context_drops_oldest_turns(contents, system, limit, reserve, left, dropped):
    m = msgs(*contents, system=system)
    ids, n = fit_context(chars, m, limit, reserve)
    assert [x["content"] for x in m] == left and n == dropped
    assert ids is not None and len(ids) == sum(map(len, left)) < limit


def test_fit_context_refuses_a_message_that_cannot_fit_alone_and_keeps_the_conversation():
    """The earlier turns stay (the chat then drops only the refused message); they had been deleted while looking
    for room."""
    m = msgs("aa", "bb", "x" * 30, system="S")
    ids, n = fit_context(chars, m, 20, 4)
    assert ids is None and [x["content"] for x in m] == ["S", "aa", "bb", "x" * 30] and n == 0


def test_a_refused_message_leaves_the_earlier_turns_to_the_next_one(capsys, monkeypatch, tiny_qwen2_dir):
    """Through the chat: a message too long for the context is refused, and the next message's prompt still holds
    the turn before it."""
    import engine.chat as chat_mod
    seen = []
    real = chat_mod.prompt_ids

    def spy(tokenizer, args, messages):
        seen.append([m["content"] for m in messages])
        return real(tokenizer, args, messages)
    monkeypatch.setattr(chat_mod, "prompt_ids", spy)
    rc, out, err = run_chat(capsys, monkeypatch, ["first turn", "word " * 300, "next turn"],
                            ["--model", str(tiny_qwen2_dir), *CPU, "--max-context", "192", "--max-new-tokens", "4"])
    assert rc == 0 and "does not fit the context (192 tokens) even alone" in err, err
    assert "dropped" not in err
    assert seen[-1][0] == "first turn" and seen[-1][-1] == "next turn" and len(seen[-1]) == 3, (seen, err)


def run_chat(capsys, monkeypatch, lines: list[str], argv: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_long_chat_keeps_going_with_context_shift(capsys, monkeypatch, tiny_qwen2_dir):
    turns = [f"turn number {i} says something moderately long" for i in range(6)]
    rc, out, err = run_chat(capsys, monkeypatch, [*turns, "word " * 300, "still here?"],
                            ["--model", str(tiny_qwen2_dir), *CPU, "--system", "Be brief.", "--max-context", "96",
                             "--max-new-tokens", "6"])
    assert rc == 0 and "Traceback" not in err, err
    assert "note: context full (96 tokens): dropped the" in err
    assert err.count("does not fit the context (96 tokens) even alone") == 1
    assert err.count("finish: ") == len(turns) + 1, "every turn but the refused one got a reply"
    assert re.search(r"finish: (eos|length \(--max-new-tokens 6\)|length \(context full)", err)


def test_a_message_that_is_not_utf8_is_refused_and_the_chat_goes_on(capsys, monkeypatch, tiny_qwen2_dir):
    rc, out, err = run_chat(capsys, monkeypatch, ["caf\udce9", "hello"],  # bytes a Latin-1 terminal sends
                            ["--model", str(tiny_qwen2_dir), *CPU, "--max-new-tokens", "3"])
    assert rc == 0 and "Traceback" not in err, err
    assert "note: this message is not UTF-8 text: character 3 is an unpaired surrogate" in err
    assert err.count("finish: ") == 1, "the next message got its reply"


def test_json_with_chat_is_an_error(capsys, tiny_qwen2_dir):
    assert main(["--model", str(tiny_qwen2_dir), *CPU, "--json"]) == 2
    assert "--json needs --prompt" in capsys.readouterr().err


def test_first_token_eos_says_empty_reply(capsys, monkeypatch, tiny_qwen2_dir):
    def eos_at_once(engine, prompts, params, max_new_tokens, stop, on_text, seeds=None):
        stats = {"prompt_tokens": len(prompts[0]), "generated_tokens": 0, "prefill_tok_s": 100.0,
                 "decode_tok_s": 0.0, "host_rss_bytes": 1 << 20}
        return Generation([[]], [""], ["eos"], stats)

    monkeypatch.setattr(engine.generate, "generate", eos_at_once)
    rc, out, err = run_chat(capsys, monkeypatch, ["hi"], ["--model", str(tiny_qwen2_dir), *CPU])
    assert rc == 0 and out == ""
    assert "(empty reply: the model's first token was end-of-sequence)" in err
    assert "finish: eos" in err and "decode -" in err and "0.00 tok/s" not in err


# ------------------------------------------------------------------------------------------ pty

class Pty:
    """The CLI on a pseudo-terminal (its controlling terminal: Ctrl-C there is a SIGINT)."""

    def __init__(self, argv: list[str]) -> None:
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            # a terminal user's Ctrl-C interrupts: undo an ignored SIGINT inherited from how the test runner
            # was started (a background job of a non-interactive shell ignores it, and so would the CLI)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(ROOT)
            os.environ["PYTHONPATH"] = str(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "engine.run", *argv])
        self.buf = b""

    def expect(self, pattern: bytes, timeout: float = 60.0) -> bytes:
        """Read until ``pattern`` (a regex) appears after what earlier calls consumed; return the text read."""
        end = time.monotonic() + timeout
        while not (m := re.search(pattern, self.buf)):
            left = end - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; got:\n{self.buf.decode(errors='replace')}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    self.buf += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    assert re.search(pattern, self.buf), self.buf.decode(errors="replace")
        seen, self.buf = self.buf[:m.end()], self.buf[m.end():]
        return seen

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self, timeout: float = 30.0) -> int:
        """Ctrl-D, then the exit code. A child still running after ``timeout`` seconds (a failed step left
        a half-typed line, where Ctrl-D deletes a character) is killed: the test fails, it never hangs."""
        self.send(b"\x04")
        end = time.monotonic() + timeout
        while (pid_status := os.waitpid(self.pid, os.WNOHANG))[0] == 0 and time.monotonic() < end:
            time.sleep(0.1)
        if pid_status[0] == 0:
            os.kill(self.pid, signal.SIGKILL)
            pid_status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(pid_status[1])


def _prompt_tokens(seen: bytes) -> int:
    return int(re.search(rb"\| (\d+) prompt \+", seen).group(1))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="pty test written for Linux")
def test_pty_line_editing_history_and_ctrl_c(tiny_qwen2_dir):
    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    edited, raw = "abXc the cat", "abc\x1b[DX the cat"
    assert len(tok.encode(edited)) != len(tok.encode(raw))
    p = Pty(["--model", str(tiny_qwen2_dir), *CPU, "--no-chat", "--max-new-tokens", "2", "--max-context", "256"])
    try:
        p.expect(rb"Ctrl-D quits.*\r\n> ", timeout=120)
        p.send(b"abc\x1b[DX the cat\r")  # left arrow, then X: readline edits the line
        seen = p.expect(rb"finish: [^\r\n]*\r\n> ")
        assert _prompt_tokens(seen) == len(tok.encode(edited)) and b"^[[D" not in seen
        p.send(b"\x1b[A\r")  # up arrow: the same line from history
        assert _prompt_tokens(p.expect(rb"finish: [^\r\n]*\r\n> ")) == len(tok.encode(edited))
        p.send(b"never sent")
        time.sleep(0.5)
        p.send(b"\x03")  # Ctrl-C at the prompt: clears the line, keeps the session
        p.expect(rb"\^C \(Ctrl-D quits\)\r\n> ")
        p.send(b"dog\r")
        assert _prompt_tokens(p.expect(rb"finish: [^\r\n]*\r\n> ")) == len(tok.encode("dog"))
    finally:
        rc = p.close()
    assert rc == 0


def test_special_tokens_a_reply_samples_are_not_its_text(monkeypatch, tiny_qwen2_dir):
    """A sampled special token that is not end-of-sequence (a chat template's <|im_start|>) is not printed nor kept
    in the reply's text, so the next chat turn does not feed it back as a control token (the server skipped them
    already)."""
    import torch

    from engine.sampling import SamplingParams
    from tests.helpers import make_engine

    eng = make_engine(tiny_qwen2_dir, max_context=128)
    tok = eng.tokenizer
    start = tok.encode("<|im_start|>", add_special_tokens=False)
    assert len(start) == 1 and start[0] not in tok.eos_ids
    ids = tok.encode("Sure", add_special_tokens=False) + start + tok.encode("user", add_special_tokens=False)
    script = iter(ids)

    def scripted(engine, sampler, logits, history, reasons, out):
        t = next(script)
        return torch.tensor([t]), [t]
    monkeypatch.setattr(engine.generate, "_next_tokens", scripted)
    shown: list[str] = []
    gen = engine.generate.generate(eng, [tok.encode("hi", add_special_tokens=False)], SamplingParams(),
                                   max_new_tokens=len(ids), on_text=lambda i, s: shown.append(s))
    eng.close()
    assert "<|im_start|>" not in gen.texts[0] and "".join(shown) == gen.texts[0] == "Sureuser"

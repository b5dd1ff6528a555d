"""The interactive chat of ``layerstream`` (no ``--prompt``).

Replies stream to stdout; the ``> `` prompt, notes and stats go to stderr, so ``layerstream > log``
keeps only the replies. On a terminal, ``readline`` gives line editing and history; Ctrl-C at the
prompt clears the line, Ctrl-C during a reply stops it, Ctrl-D quits. When the conversation
outgrows ``--max-context``, the oldest turns are dropped (the system message stays), like
llama.cpp's context shift; a message that cannot fit even alone is refused and the chat goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from engine.cli_output import print_reply_end
from engine.cli_session import prompt_ids
from engine.text import utf8_problem

PROMPT = "> "


def _use_readline() -> bool:
    """Line editing and history when both ends are a terminal (input() then goes through readline)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    try:
        import readline  # noqa: F401  (importing it is what switches input() to line editing)
    except ImportError:
        return False
    return True


def read_line(editing: bool) -> str | None:
    """One line from the user; None at end of input (Ctrl-D). KeyboardInterrupt passes through."""
    if editing:
        try:
            return input(PROMPT)
        except EOFError:
            return None
    sys.stderr.write(PROMPT)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def fit_context(encode: Callable[[list[dict]], list[int]], messages: list[dict], max_context: int,
                reserve: int) -> tuple[list[int] | None, int]:
    """Drop the oldest turns (keeping a leading system message) until the conversation plus ``reserve``
    reply tokens fits ``max_context``; returns (prompt ids or None when the last message cannot fit
    even alone, number of messages dropped). ``messages`` loses the dropped turns in place, and only when the
    conversation then fits: a message that cannot fit leaves every earlier turn where it was (it had emptied the
    conversation down to the system message before the new message was refused)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    trial, dropped = list(messages), 0
    while True:
        ids = encode(trial)
        if len(ids) + reserve <= max_context:
            break
        if len(trial) - first <= 1:  # only the new message is left
            if len(ids) >= max_context:
                return None, 0
            break
        cut = 2 if len(trial) - first > 2 and trial[first + 1]["role"] == "assistant" else 1
        del trial[first:first + cut]
        dropped += cut
    messages[:] = trial
    return ids, dropped


def chat(engine, args, generate: Callable[[list[int]], object]) -> int:
    """Run the chat until Ctrl-D; ``generate(ids)`` streams one reply to stdout and returns a Generation."""
    editing = _use_readline()
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    max_context = engine.opts.max_context
    reserve = min(args.max_new_tokens, max(1, max_context // 4))
    print("interactive chat: type a message; Ctrl-D quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = read_line(editing)
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the session
            print("^C (Ctrl-D quits)", file=sys.stderr)
            continue
        if line is None:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if problem := utf8_problem(line):
            print(f"note: this message is not UTF-8 text: {problem}; check the terminal's encoding (locale) "
                  "and type it again", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids, dropped = fit_context(lambda m: prompt_ids(engine.tokenizer, args, m), messages, max_context, reserve)
        if dropped:
            print(f"note: context full ({max_context} tokens): dropped the {dropped} oldest message(s); "
                  "the model no longer sees them", file=sys.stderr)
        if ids is None:
            messages.pop()
            print(f"note: this message does not fit the context ({max_context} tokens) even alone: shorten it or "
                  "restart with a larger --max-context", file=sys.stderr)
            continue
        gen = generate(ids)
        print_reply_end(gen, args, streamed=True)
        messages.append({"role": "assistant", "content": gen.texts[0]})

"""JSON mode (``response_format: {"type": "json_object"}``): the reply is held to one JSON object.

A character-level pushdown recogniser of JSON (RFC 8259) whose top level must be an object; a state is an
immutable tuple, so a candidate token is tried without touching the sequence's state. The sampler
(engine.serving.rows) draws as usual and keeps the token when the recogniser accepts its text; otherwise it
draws again among the most likely tokens that it accepts (engine.serving.constrain). End of sequence is allowed
only once the object is closed, and is then the only token allowed. Runs of whitespace are capped so a
model cannot pad forever.
"""

from __future__ import annotations

MAX_WS = 64  # consecutive whitespace characters allowed (indented output needs some)
WS = " \t\n\r"
_HEX = set("0123456789abcdefABCDEF")
_DIGITS = set("0123456789")

# modes: a value expected (VALUE / FIRST_VALUE: also "]" to close an empty array), an object's first key or
# "}" (KEY_OR_END), a key (KEY), ":" (COLON), "," or a closing bracket (AFTER), inside a string (STR, STR_KEY;
# ESC after a backslash, U1-U4 for \\u hex digits), a number's parts, a literal's remaining letters, DONE
VALUE, FIRST_VALUE, KEY_OR_END, KEY, COLON, AFTER, DONE = "value", "first", "key|}", "key", ":", "after", "done"
STR, STR_KEY, ESC = "str", "strkey", "esc"
NUMBER_END = {"int0", "int", "frac", "exp"}  # a number may end in these parts
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

State = tuple  # (mode, containers "{[" as a string, aux: the rest of a literal / hex count / the string's kind, ws run)
START: State = ("start", "", "", 0)


def step(state: State, ch: str) -> State | None:
    """The state after ``ch``, or None when ``ch`` cannot come next."""
    mode, stack, aux, ws = state
    if mode in (STR, STR_KEY):
        if ch == '"':
            return (COLON, stack, "", 0) if mode == STR_KEY else _after_value(stack)
        if ch == "\\":
            return (ESC, stack, mode, 0)
        return None if ord(ch) < 0x20 else state
    if mode == ESC:
        if ch == "u":
            return ("u", stack, aux + ":4", 0)
        return (aux, stack, "", 0) if ch in '"\\/bfnrt' else None
    if mode == "u":
        kind, left = aux.split(":")
        if ch not in _HEX:
            return None
        return (kind, stack, "", 0) if left == "1" else ("u", stack, f"{kind}:{int(left) - 1}", 0)
    if mode == "lit":
        if not aux or ch != aux[0]:
            return None
        return ("lit", stack, aux[1:], 0) if len(aux) > 1 else _after_value(stack)
    if mode in _NUMBER_PARTS:
        nxt = _number(mode, ch)
        if nxt is not None:
            return (nxt, stack, "", 0)
        if mode not in NUMBER_END:
            return None
        after = _after_value(stack)  # the number ended: ``ch`` is read after it
        return step(after, ch)
    if ch in WS:
        return None if ws >= MAX_WS or mode == DONE else (mode, stack, aux, ws + 1)
    return _structural(mode, stack, ch)


def _structural(mode: str, stack: str, ch: str) -> State | None:
    if mode == "start":
        return (KEY_OR_END, "{", "", 0) if ch == "{" else None
    if mode in (KEY_OR_END, KEY):
        if ch == '"':
            return (STR_KEY, stack, "", 0)
        return _close(stack, "}") if ch == "}" and mode == KEY_OR_END else None
    if mode == COLON:
        return (VALUE, stack, "", 0) if ch == ":" else None
    if mode == AFTER:
        if ch == ",":
            return (KEY if stack[-1] == "{" else VALUE, stack, "", 0)
        return _close(stack, ch) if ch in "}]" else None
    if mode in (VALUE, FIRST_VALUE):
        if ch == "]" and mode == FIRST_VALUE:
            return _close(stack, "]")
        return _value_start(stack, ch)
    return None  # DONE


def _value_start(stack: str, ch: str) -> State | None:
    if ch == '"':
        return (STR, stack, "", 0)
    if ch == "{":
        return (KEY_OR_END, stack + "{", "", 0)
    if ch == "[":
        return (FIRST_VALUE, stack + "[", "", 0)
    if ch in _LITERALS:
        return ("lit", stack, _LITERALS[ch], 0)
    if ch == "-":
        return ("sign", stack, "", 0)
    if ch in _DIGITS:
        return ("int0" if ch == "0" else "int", stack, "", 0)
    return None


def _close(stack: str, ch: str) -> State | None:
    if not stack or stack[-1] != ("{" if ch == "}" else "["):
        return None
    return _after_value(stack[:-1])


def _after_value(stack: str) -> State:
    return (AFTER, stack, "", 0) if stack else (DONE, "", "", 0)


_NUMBER_PARTS = {"sign", "int0", "int", "dot", "frac", "e", "esign", "exp"}


def _number(part: str, ch: str) -> str | None:
    """The number's next part after ``ch``, or None when ``ch`` does not continue it."""
    digit = ch in _DIGITS
    if part == "sign":
        return ("int0" if ch == "0" else "int") if digit else None
    if part in ("int0", "int"):
        if digit:
            return "int" if part == "int" else None
        return "dot" if ch == "." else "e" if ch in "eE" else None
    if part == "dot":
        return "frac" if digit else None
    if part == "frac":
        return "frac" if digit else "e" if ch in "eE" else None
    if part == "e":
        return "exp" if digit else "esign" if ch in "+-" else None
    return "exp" if digit else None  # esign, exp


def feed(state: State, text: str) -> State | None:
    """The state after ``text``, or None if some character of it cannot come where it does."""
    for ch in text:
        state = step(state, ch)
        if state is None:
            return None
    return state


def done(state: State) -> bool:
    """Whether the top-level object is complete (a number cannot end the top level: it is an object)."""
    return state[0] == DONE

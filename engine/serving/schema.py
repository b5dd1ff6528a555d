"""Structured outputs (``response_format: {"type": "json_schema", ...}``): a JSON Schema compiled into a
character-level recogniser that the sampler holds the reply to (engine.serving.constrain).

Each node of the compiled schema has a start state, a ``step(state, ch)`` that gives the next state or None,
and ``complete(state)``; states are immutable tuples, so a candidate token is tried without committing it.
Served: ``type`` (object, array, string, number, integer, boolean, null, or a list of them), ``properties`` and
``required`` (the properties come in the schema's order; optional ones may be left out; no others are
written), ``items``, ``minItems`` / ``maxItems``, ``enum``, ``const``, ``anyOf`` / ``oneOf``, ``$ref`` into
``$defs`` / ``definitions`` (not recursive), and an empty schema (any JSON value). Annotations (``title``,
``description``, ``default``, ``examples``, ``format`` - not checked) are ignored; any other keyword is a
ValueError naming it, since the reply could not be held to it.
"""

from __future__ import annotations

import functools
import json

from engine.serving import json_mode

MAX_WS = 16  # whitespace characters allowed at one place between tokens of the structure
IGNORED = {"title", "description", "default", "examples", "format", "$schema", "$id", "$comment",
           "additionalProperties", "strict", "deprecated", "readOnly", "writeOnly"}
SERVED = {"type", "properties", "required", "items", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf",
          "$ref", "$defs", "definitions"}


class Text:
    """Exactly one of these texts (a literal, or an enum's JSON values)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.start = texts, ""

    def step(self, typed: str, ch: str) -> str | None:
        return typed + ch if any(t.startswith(typed + ch) for t in self.texts) else None

    def complete(self, typed: str) -> bool:
        return typed in self.texts


class Generic:
    """Any JSON value of one kind (json_mode's recogniser, started on a value)."""

    def __init__(self, first: str) -> None:
        self.first, self.start = first, ("value", "", "", 0)

    def step(self, state, ch: str):
        if state == self.start and ch not in self.first:
            return None
        nxt = json_mode.step(state, ch)
        return None if nxt is None or nxt[0] == "value" and nxt[1] == "" and nxt[3] else nxt  # none before it

    def complete(self, state) -> bool:
        return state[0] == json_mode.DONE or (state[1] == "" and state[0] in json_mode.NUMBER_END)


class Integer(Generic):
    """A JSON number without a fraction or an exponent."""

    def __init__(self) -> None:
        super().__init__("-0123456789")

    def step(self, state, ch: str):
        return None if ch in ".eE" else super().step(state, ch)


class Union:
    """Any one of several nodes: the state holds every branch still possible."""

    def __init__(self, nodes: list) -> None:
        self.nodes, self.start = nodes, tuple((i, n.start) for i, n in enumerate(nodes))

    def step(self, state, ch: str):
        alive = tuple((i, s) for i, sub in state if (s := self.nodes[i].step(sub, ch)) is not None)
        return alive or None

    def complete(self, state) -> bool:
        return any(self.nodes[i].complete(sub) for i, sub in state)


class Array:
    """``[`` items ``]`` with at least / at most so many items; states (phase, item state, count, ws)."""

    def __init__(self, item, least: int = 0, most: int | None = None) -> None:
        self.item, self.least, self.most, self.start = item, least, most, ("open", None, 0, 0)

    def step(self, state, ch: str):
        phase, sub, count, ws = state
        if phase == "item":
            nxt = self.item.step(sub, ch)
            if nxt is not None:
                return ("item", nxt, count, 0)
            if not self.item.complete(sub):
                return None
            phase, count, ws = "after", count + 1, 0
        if ch in json_mode.WS and phase != "open" and phase != "done":
            return (phase, sub, count, ws + 1) if ws < MAX_WS else None
        if phase == "open":
            return ("first", None, 0, 0) if ch == "[" else None
        if phase in ("first", "next") and not (phase == "first" and ch == "]"):
            if self.most is not None and count >= self.most:
                return None
            nxt = self.item.step(self.item.start, ch)
            return ("item", nxt, count, 0) if nxt is not None else None
        if ch == "]" and count >= self.least and phase in ("first", "after"):
            return ("done", None, count, 0)
        if ch == "," and phase == "after" and (self.most is None or count < self.most):
            return ("next", None, count, 0)
        return None

    def complete(self, state) -> bool:
        return state[0] == "done"


class Object:
    """``{`` the properties in order ``}``; optional ones may be skipped. States (phase, next property,
    the key typed or the value's state, ws)."""

    def __init__(self, props: list[tuple[str, object, bool]]) -> None:
        self.props, self.start = props, ("open", 0, None, 0)
        self.keys = [json.dumps(name, ensure_ascii=False) for name, _, _ in props]

    def _candidates(self, idx: int) -> list[int]:
        """The properties that may come next: up to and including the next required one."""
        out = []
        for j in range(idx, len(self.props)):
            out.append(j)
            if self.props[j][2]:
                break
        return out

    def _may_close(self, idx: int) -> bool:
        return not any(req for _, _, req in self.props[idx:])

    def step(self, state, ch: str):
        phase, idx, sub, ws = state
        if phase == "value":
            node = self.props[idx - 1][1]
            nxt = node.step(sub, ch)
            if nxt is not None:
                return ("value", idx, nxt, 0)
            if not node.complete(sub):
                return None
            phase, ws = "after", 0
        if phase == "key":
            typed = sub + ch
            if any(self.keys[j].startswith(typed) for j in self._candidates(idx)):
                return ("key", idx, typed, 0)
            if sub not in self.keys:
                return None
            idx, phase = self.keys.index(sub) + 1, "colon"
        if ch in json_mode.WS and phase not in ("open", "done"):
            return (phase, idx, None, ws + 1) if ws < MAX_WS else None
        if phase == "open":
            return ("first", 0, None, 0) if ch == "{" else None
        if phase in ("first", "comma") and ch == '"' and self._candidates(idx):
            return ("key", idx, '"', 0)
        if ch == "}" and (phase == "after" or phase == "first") and self._may_close(idx):
            return ("done", idx, None, 0)
        if phase == "after" and ch == "," and self._candidates(idx):
            return ("comma", idx, None, 0)
        if phase == "colon" and ch == ":":
            return ("colon-ws", idx, None, 0)
        if phase == "colon-ws":
            nxt = self.props[idx - 1][1].step(self.props[idx - 1][1].start, ch)
            return ("value", idx, nxt, 0) if nxt is not None else None
        return None

    def complete(self, state) -> bool:
        return state[0] == "done"


ANY_FIRST = '"{[tfn-0123456789'


def compile_schema(schema: dict) -> object:
    """The recogniser of replies that ``schema`` accepts (see the module docstring); ValueError for what
    cannot be held."""
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    return _node(schema, defs, ())


def _node(schema, defs: dict, refs: tuple) -> object:
    if schema is True or schema == {}:
        return Generic(ANY_FIRST)
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {schema!r}")
    if bad := sorted(set(schema) - SERVED - IGNORED):
        raise ValueError(f"JSON schema keyword {bad[0]!r} is not supported (served: {', '.join(sorted(SERVED))})")
    if "$ref" in schema:
        ref = schema["$ref"]
        name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
        if name not in defs or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise ValueError(f"JSON schema $ref {ref!r} does not name an entry of $defs")
        if name in refs:
            raise ValueError(f"JSON schema $ref {ref!r} is recursive, which is not supported")
        return _node(defs[name], defs, refs + (name,))
    if "const" in schema:
        return Text(_spellings([schema["const"]]))
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise ValueError("JSON schema enum must be a non-empty list")
        return Text(_spellings(schema["enum"]))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise ValueError(f"JSON schema {key} must be a non-empty list")
            return Union([_node(s, defs, refs) for s in schema[key]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return Union([_node({**schema, "type": k}, defs, refs) for k in kind])
    return _typed(kind, schema, defs, refs)


def _spellings(values: list) -> list[str]:
    """The JSON texts of ``values``, non-ASCII characters as themselves and as \\u escapes."""
    return list(dict.fromkeys(json.dumps(v, ensure_ascii=a) for v in values for a in (False, True)))


def _typed(kind, schema: dict, defs: dict, refs: tuple) -> object:
    if kind is None:
        return Generic(ANY_FIRST)
    if kind == "object":
        props = schema.get("properties")
        if not props:
            return Generic("{")
        required = schema.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise ValueError("JSON schema properties must be an object and required a list")
        if missing := [r for r in required if r not in props]:
            raise ValueError(f"JSON schema requires {missing[0]!r}, which is not among its properties")
        return Object([(name, _node(sub, defs, refs), name in required) for name, sub in props.items()])
    if kind == "array":
        least, most = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(least, int) or most is not None and (not isinstance(most, int) or most < least):
            raise ValueError("JSON schema minItems / maxItems must be integers, minItems <= maxItems")
        return Array(_node(schema.get("items", {}), defs, refs), least, most)
    nodes = {"string": lambda: Generic('"'), "number": lambda: Generic("-0123456789"), "integer": Integer,
             "boolean": lambda: Text(["true", "false"]), "null": lambda: Text(["null"])}
    if kind not in nodes:
        raise ValueError(f"JSON schema type {kind!r} is not one of object, array, {', '.join(nodes)}")
    return nodes[kind]()


@functools.lru_cache(maxsize=64)
def compiled(schema_json: str) -> object:
    """:func:`compile_schema` of a schema given as canonical JSON text, cached (requests repeat theirs)."""
    return compile_schema(json.loads(schema_json))

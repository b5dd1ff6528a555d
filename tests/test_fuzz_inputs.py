"""bench/fuzz_inputs.py: the field walker finds a GGUF header's structural fields, a mutated header still
parses or fails with one error line, and the runner tells a kept rule from a broken one."""

from __future__ import annotations

import random
import struct

from bench.fuzz_inputs import Case, gguf_fields, mutate_gguf, run_one
from engine.gguf.reader import read_part


def test_gguf_fields_are_the_headers_type_and_tensor_fields(tmp_path, tiny_qwen2_dir):
    from engine.gguf.writer import write_gguf

    path = write_gguf(tiny_qwen2_dir, tmp_path / "t.gguf", "Q8_0")[0]
    data = path.read_bytes()
    fields = gguf_fields(data)
    tensors = read_part(path)[1]
    offsets = [off for kind, off, _ in fields if kind == "toff"]
    assert len(offsets) == len(tensors) == sum(kind == "ttype" for kind, _, _ in fields)
    start = tensors[0].offset  # the data section: the first tensor's offset in the table is 0
    assert [struct.unpack_from("<Q", data, o)[0] + start for o in offsets] == [t.offset for t in tensors]
    assert all(struct.unpack_from("<I", data, o)[0] in (0, 1, 8) for kind, o, _ in fields if kind == "ttype")
    mutated = mutate_gguf(random.Random(0), data, fields, min(o for k, o, _ in fields if k == "ndims"))
    assert len(mutated) == len(data) and mutated != data


def test_runs_keep_or_break_the_rule(tmp_path):
    case = Case("cli", tmp_path, None)
    argv, _ = case.make(random.Random(1))
    ok, _ = run_one(argv)
    assert ok
    assert run_one(["--model", str(case.default), "--prompt", "hi", "--max-new-tokens", "0"]) == (
        True, "error: --max-new-tokens must be >= N, got N (see layerstream --help)")
    ok, message = run_one(["--model", str(case.default), "--prompt", "hi", "--max-new-tokens", "2", "--json"])
    assert ok and message == "exit N"


def test_an_escaping_exception_breaks_the_rule(monkeypatch):
    import bench.fuzz_inputs as fuzz

    def crash(argv):
        raise KeyError("deep inside")
    monkeypatch.setattr(fuzz, "run_main", crash)
    assert run_one([]) == (False, "KeyError: 'deep inside'")
    monkeypatch.setattr(fuzz, "run_main", lambda argv: 1)  # exit 1 with no error line
    assert run_one([])[0] is False


def test_the_server_fuzzers_rule():
    from bench.fuzz_server import kept, request

    envelope = b'{"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": null}}'
    assert kept(400, envelope, {}) and kept(503, envelope, {}) and kept(200, b'{"id": "x"}', {})
    assert not kept(500, envelope, {}) and not kept(500, b"Internal Server Error", {})
    assert not kept(400, b"Bad Request", {})  # not OpenAI's envelope
    assert kept(200, b'data: {"x": 1}\n\ndata: [DONE]\n\n', {"stream": True})
    assert not kept(200, b'data: {"x": 1}\n\n', {"stream": True})  # a stream cut short
    rng = random.Random(0)
    paths = {request(rng)[0] for _ in range(50)}
    assert paths == {"/v1/chat/completions", "/v1/completions"}

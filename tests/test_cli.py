"""The command line (``engine.run.main``) on a synthesized tiny-qwen2 checkpoint, on the CPU."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import engine.cli_session as cli_session
from engine.config import ModelConfig
from engine.engine import Engine, EngineOptions
from engine.generate import generate
from engine.layout import LayerLayout
from engine.run import main
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from engine.footprint import min_budget
from tests.helpers import dir_snapshot

CPU = ["--device", "cpu"]


def run_json(capsys, argv: list[str]) -> tuple[dict, str]:
    """Run with --json; stdout must be exactly one JSON object (one line)."""
    rc = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, f"exit {rc}, stderr:\n{err}"
    assert "Traceback" not in err
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got:\n{out}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj, err


@pytest.fixture(scope="module")
def greedy_ref(tiny_qwen2_dir):
    """prompt ids -> greedy token ids, straight through Engine + generate (the CLI's defaults)."""
    engine = Engine(tiny_qwen2_dir, EngineOptions(device="cpu"))

    def run(ids: list[int], n: int) -> list[int]:
        return generate(engine, [ids], SamplingParams(), max_new_tokens=n).token_ids[0]

    yield run
    engine.close()


def test_json_output(capsys, tiny_qwen2_dir, greedy_ref):
    before = dir_snapshot(tiny_qwen2_dir)
    obj, err = run_json(capsys, ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "5", *CPU])
    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    assert {"token_ids", "text", "stats", "plan", "prompt_token_ids", "finish_reason"} <= set(obj)
    ids = obj["token_ids"]
    assert isinstance(ids, list) and 1 <= len(ids) <= 5 and all(isinstance(i, int) for i in ids)
    assert obj["finish_reason"] == ("max_new_tokens" if len(ids) == 5 else "eos")
    assert obj["text"] == tok.decode(ids)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert obj["prompt_token_ids"] == tok.encode(chat, add_special_tokens=False)
    assert ids == greedy_ref(obj["prompt_token_ids"], 5)
    stats = obj["stats"]
    for key in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "host_rss_bytes"):
        assert isinstance(stats[key], (int, float)) and stats[key] >= 0, key
    assert stats["prefill_tok_s"] > 0
    assert stats["prompt_tokens"] == len(obj["prompt_token_ids"]) and stats["generated_tokens"] == len(ids)
    assert stats["batch"] == 1
    phases = stats["startup_s"]  # where a start's time goes: open, plan (with its measurements), weights, compile
    assert set(phases) == {"open", "plan", "measure_h2d", "measure_host", "weights", "compile_ahead", "graphs"}
    assert phases["measure_h2d"] + phases["measure_host"] <= phases["plan"]  # parts of it
    assert all(isinstance(v, float) and v >= 0 for v in phases.values()) and 0 <= stats["prefill_compile_s"] < 0.1
    plan = obj["plan"]
    assert plan["resident_layers"] == [0, 1, 2] and plan["streamed_layers"] == [] and plan["lm_head_resident"]
    assert any("CPU" in n for n in plan["notes"])
    assert obj["random_weights"] is False
    assert dir_snapshot(tiny_qwen2_dir) == before


def test_plain_output_streams_text(capsys, tiny_qwen2_dir):
    rc = main(["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "4", *CPU])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "plan: CPU run in float32, 3/3 layers resident" in err and "tok/s" in err
    assert "finish: " in err and "predicted" not in err
    assert out.endswith("\n") and "{" not in out


def test_the_first_groups_prompt_lengths_reach_the_engine(capsys, tiny_qwen2_dir, monkeypatch):
    """The CLI tells the engine its first group's prompt lengths (compiled ahead at load, on a GPU):
    one prompt at --batch 2 is decoded twice."""
    seen = []
    real = cli_session.load_engine
    monkeypatch.setattr(cli_session, "load_engine",
                        lambda spec, opts, **kw: seen.append(opts.first_prompts) or real(spec, opts, **kw))
    raw, _ = run_json(capsys, ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--no-chat", "--batch", "2",
                               "--max-new-tokens", "2", *CPU])
    assert seen == [(len(raw["prompt_token_ids"]),) * 2]


def test_no_chat_and_system(capsys, tiny_qwen2_dir, greedy_ref):
    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    raw, _ = run_json(capsys, ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--no-chat",
                               "--max-new-tokens", "3", *CPU])
    assert raw["prompt_token_ids"] == tok.encode("hi")
    assert raw["token_ids"] == greedy_ref(raw["prompt_token_ids"], 3)
    sys_, _ = run_json(capsys, ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--system", "Be brief.",
                                "--max-new-tokens", "3", *CPU])
    prompt = tok.decode(sys_["prompt_token_ids"])
    assert "Be brief." in prompt and "hi" in prompt and len(sys_["prompt_token_ids"]) > len(raw["prompt_token_ids"])


def test_seeded_sampling_is_reproducible(capsys, tiny_qwen2_dir):
    args = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "8", "--temperature", "0.8",
            "--top-p", "0.9", *CPU]
    a, _ = run_json(capsys, [*args, "--seed", "1"])
    b, _ = run_json(capsys, [*args, "--seed", "1"])
    c, _ = run_json(capsys, [*args, "--seed", "2"])
    assert (a["token_ids"], a["text"]) == (b["token_ids"], b["text"])
    assert c["token_ids"] != a["token_ids"], "seed 2 gave the same 8 sampled tokens as seed 1"


def test_batch_2(capsys, tiny_qwen2_dir, greedy_ref):
    obj, _ = run_json(capsys, ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "5",
                               "--batch", "2", *CPU])
    assert obj["stats"]["batch"] == 2 and obj["plan"]["batch"] == 2
    assert obj["token_ids"] == greedy_ref(obj["prompt_token_ids"], 5)
    assert obj["stats"]["prompt_tokens"] == 2 * len(obj["prompt_token_ids"])


def test_show_plan(capsys, tiny_qwen2_dir):
    rc = main(["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "2", "--show-plan", *CPU])
    out, err = capsys.readouterr()
    assert rc == 0, err
    for fragment in ("module", "placement", "tier", "embed_tokens", "layers.0", "lm_head", "resident weights",
                     "KV cache", "total VRAM"):
        assert fragment in err, fragment


def _budgets(model_dir) -> dict[str, int]:
    cfg = ModelConfig.from_file(model_dir / "config.json")
    low = min_budget(cfg, torch.float32, batch=1, max_context=4096, prefill_chunk=2048)  # the CLI's defaults
    return {"min": low, "min+layer": low + LayerLayout.build(cfg, torch.float32).nbytes}


@pytest.mark.parametrize("budget,host", [("min", None), ("min+layer", None), ("min", "0")])
def test_vram_budget_forces_streaming_same_tokens(capsys, tiny_qwen2_dir, budget, host):
    """On the CPU there is no free-memory figure: with a budget the plan follows the budget alone."""
    base = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "6", *CPU]
    ref, _ = run_json(capsys, base)
    nbytes = _budgets(tiny_qwen2_dir)[budget]
    extra = ["--vram-budget", f"{nbytes}B"] + (["--host-budget", host] if host is not None else [])
    obj, _ = run_json(capsys, [*base, *extra])
    plan = obj["plan"]
    assert plan["budget_bytes"] == nbytes and plan["total_bytes"] <= nbytes
    assert not any("clamped" in n for n in plan["notes"])
    assert plan["streamed_layers"] and plan["num_slots"] >= 2
    if budget == "min":
        assert plan["resident_layers"] == [] and not plan["lm_head_resident"] and plan["lm_head_chunks"] >= 2
    else:
        assert plan["resident_layers"] == [2] and plan["streamed_layers"] == [0, 1]
    if host == "0":
        assert plan["disk_layers"] == [0, 1, 2]
    assert obj["token_ids"] == ref["token_ids"]


def test_embedded_default(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    rc = main(["--prompt", "hi", "--max-new-tokens", "3", *CPU])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "synthesizing the embedded default" in err
    assert "RANDOM weights" in err
    assert (tmp_path / "cache" / "default-model" / "config.json").is_file()
    obj, err = run_json(capsys, ["--prompt", "hi", "--max-new-tokens", "3", *CPU])  # reuses the cache
    assert "synthesizing" not in err
    assert obj["random_weights"] is True and 1 <= len(obj["token_ids"]) <= 3


def test_interactive_chat(capsys, tiny_qwen2_dir, monkeypatch):
    """Piped stdin: the prompt goes to stderr, replies to stdout, a blank line is not sent."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n   \nand again\n"))
    calls = []
    real_generate = cli_session._generate

    def spy(engine, args, prompts, echo):
        gen = real_generate(engine, args, prompts, echo)
        calls.append((list(prompts[0]), gen, engine.tokenizer))
        return gen

    monkeypatch.setattr(cli_session, "_generate", spy)
    rc = main(["--model", str(tiny_qwen2_dir), "--max-new-tokens", "4", *CPU])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err.count("> ") == 4 and ">" not in out  # three lines read, then EOF; prompts on stderr
    assert len(calls) == 2, "the blank line must not be sent"
    (ids1, gen1, tok), (ids2, gen2, _) = calls
    first, second = tok.decode(ids1), tok.decode(ids2)
    assert "hello there" in first and "and again" not in first
    assert "hello there" in second and "and again" in second and gen1.texts[0] in second
    assert len(ids2) > len(ids1) + len(gen1.token_ids[0])
    assert gen1.texts[0] in out and gen2.texts[0] in out
    assert err.count("finish: ") == 2 and "Traceback" not in err


def test_first_tuning_note_only_when_kernels_will_be_tuned(tiny_qwen2_dir, capsys, monkeypatch):
    """The note appears before loading when the Triton kernels have nothing cached for this GPU
    (faked here: the CPU run has none to tune), never with --json, never on the CPU."""
    assert not cli_session.first_tuning(cli_session.options_from_args(
        cli_session_args(["--device", "cpu"])))
    monkeypatch.setattr(cli_session, "first_tuning", lambda opts: True)
    assert main(["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "1", *CPU]) == 0
    assert "first run with this GPU and software" in capsys.readouterr().err
    _, err = run_json(capsys, ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "1", *CPU])
    assert "first run" not in err


def cli_session_args(argv: list[str]):
    from engine.run import build_parser
    return build_parser().parse_args(argv)


def test_cpu_run_prints_no_gpu_prediction_and_only_actionable_notes(capsys, tiny_qwen2_dir):
    base = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "2", *CPU]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "note:" not in err and "predicted" not in err and "ms/step" not in err
    assert main([*base, "--show-plan"]) == 0
    err = capsys.readouterr().err
    assert "predicted        : none for a CPU run" in err and "ms/step" not in err
    nbytes = _budgets(tiny_qwen2_dir)["min"]
    assert main([*base, "--vram-budget", f"{nbytes}B", "--host-budget", "0"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "read from the checkpoint files" in notes[0] and "--host-budget" in notes[0]
    assert "disk_gbps" not in err and "3 of them read from disk" in err


def test_threads_sets_torch_compute_threads(capsys, tiny_qwen2_dir):
    before = torch.get_num_threads()
    try:
        assert main(["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "1", "--threads", "1",
                     *CPU]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_several_prompts_print_every_reply(capsys, tiny_qwen2_dir, tmp_path, greedy_ref):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("second prompt\n\nthird one\n")
    argv = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--prompts-file", str(prompts_file),
            "--max-new-tokens", "3", *CPU]
    obj, _ = run_json(capsys, [*argv, "--batch", "2"])  # 3 prompts in groups of 2
    res = obj["results"]
    assert [r["prompt"] for r in res] == ["hi", "second prompt", "third one"]
    assert len(obj["group_stats"]) == 2 and [s["batch"] for s in obj["group_stats"]] == [2, 1]
    for r in res:
        assert r["token_ids"] == greedy_ref(r["prompt_token_ids"], 3)
    assert main(argv) == 0  # default batch: all three together
    out, err = capsys.readouterr()
    assert err.count("--- reply ") == 3 and "--- reply 3/3 to: third one" in err
    assert err.count("finish: ") == 3
    for r in res:
        assert r["text"] in out


def test_nonfinite_logits_stop_with_one_error_line(tiny_qwen2_dir, capsys, monkeypatch):
    """Logits that turn NaN mid-generation (an fp16 overflow): generate raises NonFiniteLogits naming the
    dtype, the step and the prompt, and the CLI prints it as one error line, exit 1, no traceback."""
    import engine.generate as gen

    real = gen.decode_step
    steps = [0]

    def poisoned(engine, tok, start):
        logits = real(engine, tok, start)
        steps[0] += 1
        if steps[0] == 2:
            logits[-1:, 7] = float("nan")  # the last prompt's row
        return logits
    monkeypatch.setattr(gen, "decode_step", poisoned)
    eng = Engine(tiny_qwen2_dir, EngineOptions(device="cpu", dtype="fp32", kernels="torch", max_context=64, batch=2))
    try:
        with pytest.raises(gen.NonFiniteLogits, match=r"in float32 after 2 generated tokens for prompt 1$"):
            generate(eng, [[1, 2, 3], [4, 5]], SamplingParams(), max_new_tokens=6)
    finally:
        eng.close()
    steps[0] = 0
    rc = main(["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--max-new-tokens", "5", "--dtype", "fp16", *CPU])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "error: the model produced non-finite logits (NaN or inf) in float16 after 2 generated tokens" in err
    assert "try --dtype bf16" in err

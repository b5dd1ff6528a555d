"""Command line: ``python -m engine.serve [--model M] [--vram-budget 6GB] [--port 8000] [--api-key K]``

An OpenAI-compatible HTTP server (chat and text completions, streaming, /v1/models, /health,
/metrics and a chat page at /) with continuous batching: every forward pass, one stream of the
non-resident weights, serves all active requests. Binds to 127.0.0.1 unless --host says otherwise.
Before /health says ready, the server warms up: it runs the step shapes its requests will meet, so
that kernel compiles and tuning do not fall on them (engine/serving/warmup.py; --no-warmup skips it).
SIGTERM or Ctrl-C stops accepting, lets in-flight requests finish for --grace seconds, cancels the
rest (their streams end with finish_reason "abort" and [DONE]), then exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time

from engine.cli_args import CliParser, add_engine_args, check_engine_args
from engine.interrupts import deferred_interrupts, forget_handled_interrupt

log = logging.getLogger(__name__)


def build_parser(prog: str = "python -m engine.serve") -> CliParser:
    """The server's flags: address, auth, batching and KV cache, plus the engine's (as ``layerstream``)."""
    p = CliParser(prog=prog, description=__doc__.split("\n\n")[1])
    p.add_argument("--model", help="model directory, HF repo id or alias; default: the embedded tiny "
                   "random-weight model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--allowed-origin", dest="allowed_origins", action="append", metavar="ORIGIN",
                   help="a web origin (e.g. http://localhost:3000) whose pages may call the API from a browser "
                        "(CORS; repeatable; '*' = any site, best with --api-key); default: none (the chat page at / "
                        "needs none)")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model, or 'default')")
    p.add_argument("--generation-config", choices=["auto", "openai"], default="auto",
                   help="what a request that leaves out temperature / top_p / top_k / min_p / repetition_penalty "
                        "gets: auto = the model's own settings (generation_config.json, a GGUF's "
                        "general.sampling.*) where it names them, else OpenAI's; openai = OpenAI's (temperature 1, "
                        "no filters) (default: auto)")
    add_engine_args(p, host_lane=False)
    p.add_argument("--max-batch", dest="batch", type=int,
                   help="sequences decoded together, i.e. KV-cache slots (default 8; same as --batch)")
    p.set_defaults(batch=8)
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait for a slot; beyond it requests get 503 (default 64)")
    p.add_argument("--kv-cache", choices=["slots", "paged"], default="slots",
                   help="slots: one contiguous KV row per sequence (default; CUDA-graph decode); paged: blocks "
                   "with prefix reuse (a shared system prompt or earlier chat turns are not prefilled again; "
                   "decode without CUDA graphs)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block with --kv-cache paged")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the warm-up (before /health says ready, the server runs the shapes its steps meet, "
                   "so that kernel compiles and tuning do not fall on the first requests)")
    p.add_argument("--grace", type=int, default=30, help="seconds in-flight requests get at shutdown (default 30)")
    p.add_argument("--step-log", metavar="FILE",
                   help="append one JSON line per engine step (start, duration, batch, tokens fed, waiting, Triton "
                        "kernels built) to FILE")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m engine.serve") -> int:
    """Parse flags, check the model, start the engine thread and serve until SIGTERM / Ctrl-C. A signal
    before serving starts (importing torch, reading the model) stops it there, exit 0; one that a
    library swallows (a KeyboardInterrupt raised inside a ``__del__`` is only printed) is still seen
    when the server starts, which then stops at once."""
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        stopping.set()
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv, prog, stopping)
    except KeyboardInterrupt:
        print("layerstream: stopped before serving", file=sys.stderr)
        return 0
    finally:  # the caller's handlers again (a test, or an embedding program)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None, prog: str, stopping: threading.Event) -> int:
    args = build_parser(prog).parse_args(argv)  # before torch: --help answers at once
    with deferred_interrupts() as interrupted:  # a signal inside torch's import would leave it half loaded
        from engine.cli_session import load_engine, options_from_args, resolve_or_default  # torch: seconds
    if interrupted.is_set():
        stopping.set()
        raise KeyboardInterrupt

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    step_log = None
    try:
        _check_server_args(args)
        opts = options_from_args(args)
        from engine.serving.steplog import StepLog
        step_log = StepLog(args.step_log) if args.step_log else None  # before the default model is synthesized
        from engine.engine import open_model
        from engine.options import fit_context
        from engine.generation_defaults import describe
        model_dir, is_default = resolve_or_default(args.model)
        files = open_model(model_dir)  # config, headers, tokenizer: bad input fails before serving
        fit_context(files.cfg, opts)
        sampling = files.sampling if args.generation_config == "auto" else {}
        if sampling:
            print(f"layerstream: requests that leave them out get the model's sampling settings: "
                  f"{describe(sampling)} (--generation-config openai for OpenAI's)", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        if step_log is not None:
            step_log.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        loop = _serve(args, lambda: load_engine(args.model, opts, quiet=not args.verbose,
                                                resolved=(files, is_default))[0], step_log, sampling, stopping)
    finally:
        if step_log is not None:
            step_log.close()
    if loop.error is not None:
        what = "the engine failed" if loop.phase == "ready" else "loading the model failed"
        print(f"error: {what}: {loop.error}", file=sys.stderr)
        return 1
    print("layerstream: stopped", file=sys.stderr)
    return 0


def _check_server_args(args) -> None:
    """ValueError for a flag the server cannot take (before anything loads)."""
    for bad, message in ((not 0 <= args.port < 65536, f"--port must be in 0..65535, got {args.port}"),
                         (args.max_waiting < 0, f"--max-waiting must be >= 0, got {args.max_waiting}"),
                         (args.grace < 0, f"--grace must be >= 0, got {args.grace}"),
                         (args.block_size < 1, f"--block-size must be >= 1, got {args.block_size}"),
                         (args.batch is not None and args.batch < 1, f"--max-batch must be >= 1, got {args.batch}")):
        if bad:
            raise ValueError(message)
    check_engine_args(args)
    if args.host_compute != "off":
        raise ValueError("--host-compute applies to layerstream runs, not to the server (its paged KV cache "
                         "has no host lane): leave it off")
    if args.prefill_states != "auto":
        raise ValueError("--prefill-states applies to layerstream runs, not to the server (it prefills a slice "
                         "of each prompt per step, whose states never wait between passes): leave it out")
    _check_address(args.host, args.port)


def _serve(args, load, step_log, sampling: dict | None = None, stopping: threading.Event | None = None):
    """Start the engine thread (``load`` builds its engine) and serve until SIGTERM / Ctrl-C; returns the
    closed :class:`EngineLoop` (its ``error`` says whether loading or serving failed). ``sampling``: the
    defaults of what requests leave out."""
    import uvicorn

    from engine.serving.app import create_app
    from engine.serving.loop import EngineLoop
    from engine.serving.metrics import ServerMetrics
    from engine.serving.warmup import warm_up

    loop = EngineLoop(load, max_waiting=args.max_waiting, kv_cache=args.kv_cache, block_size=args.block_size,
                      warmup=warm_up if args.warmup else None)
    metrics = ServerMetrics(loop)

    def on_step(st) -> None:
        metrics.on_step(st)
        if step_log is not None:
            step_log(st)

    loop.on_step = on_step
    name = args.served_model_name or args.model or "default"
    app = create_app(loop, name, args.api_key, metrics, sampling, args.allowed_origins)
    # uvicorn's own limit only backs ours up: at --grace the engine cancels what is left, so every stream
    # still ends with a finish chunk and [DONE]
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           timeout_graceful_shutdown=args.grace + 5,
                                           log_level="info" if args.verbose else "warning"))
    # Until uvicorn installs its own handlers a signal asks it to stop as soon as it has started; after
    # a graceful shutdown it re-raises the signal it caught, which lands here too, so the exit is 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    if stopping is not None and stopping.is_set():  # a signal came before and its KeyboardInterrupt was lost
        server.should_exit = True
    loop.start()
    threading.Thread(target=_watch, args=(loop, server, args.grace), daemon=True).start()
    print(f"layerstream: serving {name!r} on http://{args.host}:{args.port} (OpenAI API under /v1, chat page "
          f"at /); the model is loading{' and warming up' if args.warmup else ''}, /health says when it is ready",
          file=sys.stderr)
    try:
        server.run()
    finally:
        loop.close()
    return loop


def _check_address(host: str, port: int) -> None:
    """ValueError when the address cannot be bound (in use, or not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(infos[0][4])
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from e


def _announce(loop, server) -> None:
    """Once loading ends: stop the server if it failed, else say it is ready (and what the warm-up ran)."""
    if loop.error is not None:
        server.should_exit = True
        return
    report = loop.warmup_report
    done = f" ({report.summary()})" if report is not None else ""
    print(f"layerstream: model loaded; ready{done}", file=sys.stderr, flush=True)


def _watch(loop, server, grace: float) -> None:
    """Stop the server when loading fails or the engine thread dies; once it is stopping, cancel what runs past
    the grace period."""
    announced = False
    while not server.should_exit:
        if loop.ready.is_set() and not announced:
            announced = True
            _announce(loop, server)
        elif announced and loop.error is not None:  # the engine thread died (a lost GPU): nothing can be served
            server.should_exit = True
        time.sleep(0.1)
    if loop.ready.is_set() and not announced:  # ready, then stopped within one poll: still say so
        _announce(loop, server)
    time.sleep(grace)
    if loop.scheduler is not None:
        loop.abort_all()


if __name__ == "__main__":
    code = main()
    forget_handled_interrupt()  # a Ctrl-C handled above still exits with its code
    sys.exit(code)

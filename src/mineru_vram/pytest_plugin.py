"""mineru-vram's pytest plugin: find the test that left memory on the GPU.

Installed with mineru-vram and loaded through the ``pytest11`` entry point. Loading
it imports only pytest and the standard library (plus mineru_vram's own
standard-library-only modules); torch is never imported by the plugin, and its
counters are read only when the tests imported torch and started CUDA themselves.

What it adds:

* ``mineru_vram_leak_check`` fixture: settles the device before and after the test
  (collect, empty torch's allocator cache, re-read until the figures agree) and
  fails the test, at teardown, when torch-allocated memory grew at all or NVML's
  per-process figure grew beyond a tolerance. The message names both figures and
  the live tensors the test left (count, total size, largest shapes). Without a
  GPU the check is a census of live CPU tensors the test created and left alive.
* ``--vram-leak-check`` (ini ``vram_leak_check = true``): the check for every test;
  ``--vram-leak-tolerance-mib`` (ini ``vram_leak_tolerance_mib``, default 32).
* ``@pytest.mark.vram_leak_check(enabled=True, tolerance_mib=None)``: per test.
* ``@pytest.mark.vram_budget(mib)``: fails a test whose peak torch allocation
  (above what was allocated when it started) exceeded ``mib``.
* ``@pytest.mark.gpu``: skipped where NVML sees no GPU.
* A report-header line with the device and settings, and a summary of the
  heaviest tests by peak memory (``--vram-top N``).
* Fixtures, prefixed so they cannot clash with a suite's own: ``mineru_vram_device``,
  ``mineru_vram_probe`` (override it to measure differently), ``mineru_vram_models``
  (a MinerU random-weights tree, built once and cached), ``mineru_vram_session`` (a
  ``ModelSession`` on it) and ``mineru_vram_standin`` (the SGLang stand-in server).
* pytest-xdist: with ``--vram-per-worker-device`` worker ``gwN`` uses ``cuda:N``
  modulo the GPU count; peaks travel to the controller for the summary.

Leaks are reported in the teardown phase, because memory a function-scoped
fixture held is only gone once that fixture is torn down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ._config import getenv

if TYPE_CHECKING:
    from ._leakcheck import LeakCheck, VramProbe
    from ._session import ModelSession
    from .testing._plugin_support import StandinServer

__all__ = [
    "mineru_vram_device",
    "mineru_vram_leak_check",
    "mineru_vram_models",
    "mineru_vram_probe",
    "mineru_vram_session",
    "mineru_vram_standin",
]

DEFAULT_TOLERANCE_MIB = 32.0
DEFAULT_TOP = 5
PEAK_PROPERTY = "vram_peak_mib"
UNCHECKED_PROPERTY = "vram_budget_unchecked"


@dataclass(frozen=True)
class _Settings:
    leak_check: bool
    tolerance_mib: float
    device_option: str | None
    per_worker: bool
    top: int
    models_dir: str | None


@dataclass
class _Results:
    peaks: list[tuple[str, float]] = field(default_factory=list)
    unchecked: list[tuple[str, str]] = field(default_factory=list)


_RESULTS_PLUGIN = "mineru-vram-results"

_settings_key = pytest.StashKey[_Settings]()
_device_key = pytest.StashKey[str]()
_call_report_key = pytest.StashKey[pytest.TestReport]()


# --- options ------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mineru-vram", "GPU memory checks (mineru-vram)")
    group.addoption(
        "--vram-leak-check",
        action="store_true",
        default=None,
        dest="vram_leak_check",
        help="check every test for VRAM leaks (as if each used the mineru_vram_leak_check fixture)",
    )
    group.addoption(
        "--vram-leak-tolerance-mib",
        type=float,
        default=None,
        dest="vram_leak_tolerance_mib",
        metavar="MIB",
        help=f"NVML per-process growth allowed per test (default {DEFAULT_TOLERANCE_MIB:g}); "
        "torch-allocated memory may not grow at all",
    )
    group.addoption(
        "--vram-device",
        default=None,
        dest="vram_device",
        metavar="DEVICE",
        help="device to measure and to give mineru_vram_session: cpu, cuda, cuda:N (default: the first GPU, else cpu)",
    )
    group.addoption(
        "--vram-per-worker-device",
        action="store_true",
        default=None,
        dest="vram_per_worker_device",
        help="under pytest-xdist, worker gwN uses cuda:N (modulo the number of GPUs)",
    )
    group.addoption(
        "--vram-top",
        type=int,
        default=None,
        dest="vram_top",
        metavar="N",
        help=f"list the N heaviest tests by peak VRAM at the end (default {DEFAULT_TOP}; 0: none)",
    )
    group.addoption(
        "--vram-models-dir",
        default=None,
        dest="vram_models_dir",
        metavar="DIR",
        help="the folder where the mineru_vram_models fixture builds (and reuses) its model tree "
        "(default: $XDG_CACHE_HOME/mineru-vram/random-models, shared with mineru-vram demo)",
    )
    parser.addini("vram_leak_check", type="bool", default=False, help="check every test for VRAM leaks")
    parser.addini(
        "vram_leak_tolerance_mib",
        type="string",
        default=str(DEFAULT_TOLERANCE_MIB),
        help="NVML per-process growth allowed per test, in MiB",
    )
    parser.addini("vram_device", type="string", default="", help="device to measure: cpu, cuda, cuda:N")
    parser.addini(
        "vram_per_worker_device", type="bool", default=False, help="under pytest-xdist, worker gwN uses cuda:N"
    )
    parser.addini("vram_top", type="string", default=str(DEFAULT_TOP), help="heaviest tests listed at the end")
    parser.addini("vram_models_dir", type="string", default="", help="where mineru_vram_models builds its tree")


def _number(config: pytest.Config, option: str, ini: str, kind: type[float] | type[int]) -> Any:
    value = config.getoption(option)
    if value is not None:
        source, raw = f"--{option.replace('_', '-')}", value
    else:
        source, raw = f"ini {ini}", config.getini(ini)
    return _non_negative(raw, source, kind)


def _non_negative(raw: Any, what: str, kind: type[float] | type[int] = float, unit: str = "") -> Any:
    """``kind(raw)``, or a usage error naming ``what`` when it is not a number >= 0."""
    try:
        number = kind(raw)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{what}={raw!r}: expected a number{unit}") from None
    if number < 0:
        raise pytest.UsageError(f"{what}={raw!r}: must be 0 or more")
    return number


def _read_settings(config: pytest.Config) -> _Settings:
    leak = config.getoption("vram_leak_check")
    per_worker = config.getoption("vram_per_worker_device")
    device = config.getoption("vram_device") or config.getini("vram_device") or None
    if device is not None:
        from ._exceptions import ConfigurationError
        from ._probe import resolve_device

        try:
            resolve_device(device)
        except ConfigurationError as exc:
            raise pytest.UsageError(f"--vram-device: {exc}") from None
    return _Settings(
        leak_check=bool(config.getini("vram_leak_check") if leak is None else leak),
        tolerance_mib=float(_number(config, "vram_leak_tolerance_mib", "vram_leak_tolerance_mib", float)),
        device_option=device,
        per_worker=bool(config.getini("vram_per_worker_device") if per_worker is None else per_worker),
        top=int(_number(config, "vram_top", "vram_top", int)),
        models_dir=config.getoption("vram_models_dir") or config.getini("vram_models_dir") or None,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vram_leak_check(enabled=True, tolerance_mib=None): check this test for VRAM leaks "
        "(enabled=False opts out of --vram-leak-check; tolerance_mib overrides the NVML tolerance)",
    )
    config.addinivalue_line(
        "markers",
        "vram_budget(mib): fail the test when its peak torch-allocated memory, above what was allocated "
        "when it started, exceeds mib MiB",
    )
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped where NVML sees none")
    config.stash[_settings_key] = _read_settings(config)
    config.pluginmanager.register(_ResultsPlugin(config), _RESULTS_PLUGIN)


def _settings(config: pytest.Config) -> _Settings:
    return config.stash[_settings_key]


def _device(config: pytest.Config) -> str:
    """The measured device, chosen once per process (NVML is asked, CUDA is not touched)."""
    device = config.stash.get(_device_key, None)
    if device is None:
        from ._leakcheck import select_device

        s = _settings(config)
        device = select_device(s.device_option, per_worker=s.per_worker, worker=getenv("PYTEST_XDIST_WORKER"))
        config.stash[_device_key] = device
    return device


# --- header, skips, reports, summary ------------------------------------------------------------


def pytest_report_header(config: pytest.Config) -> str:
    from ._leakcheck import default_probe

    s = _settings(config)
    where = default_probe(_device(config)).describe()
    if s.per_worker:
        where += "; per xdist worker: gwN -> cuda:N"
    if s.leak_check:
        mode = f"leak check on for every test, NVML tolerance {s.tolerance_mib:g} MiB"
    else:
        mode = "leak check off (--vram-leak-check, the mineru_vram_leak_check fixture or the marker turn it on)"
    return f"mineru-vram: {where}; {mode}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    from ._leakcheck import visible_device_count

    if visible_device_count() == 0:
        from ._probe import _nvml_error

        pytest.skip(f"no GPU: {_nvml_error() or 'NVML sees no device'}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_call_report_key] = report
    return report


class _ResultsPlugin:
    """Collects peaks from teardown reports (on the xdist controller too) and prints the summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results = _Results()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == PEAK_PROPERTY and isinstance(value, (int, float)):
                self.results.peaks.append((report.nodeid, float(value)))
            elif name == UNCHECKED_PROPERTY:
                self.results.unchecked.append((report.nodeid, str(value)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        top = _settings(self.config).top
        if top and self.results.peaks:
            ranked = sorted(self.results.peaks, key=lambda item: item[1], reverse=True)[:top]
            terminalreporter.write_sep("=", "mineru-vram: heaviest tests by peak VRAM (torch allocated above start)")
            for nodeid, mib in ranked:
                terminalreporter.write_line(f"{mib:10.1f} MiB  {nodeid}")
        if self.results.unchecked:
            terminalreporter.write_sep("-", "mineru-vram: vram_budget not checked")
            for nodeid, reason in self.results.unchecked:
                terminalreporter.write_line(f"{nodeid}: {reason}")


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin(_RESULTS_PLUGIN)
    if plugin is not None:
        config.pluginmanager.unregister(plugin)


# --- the leak check -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    measure: bool
    check_leaks: bool
    tolerance_mib: float
    budget_mib: float | None


def _mib(value: Any, what: str) -> float:
    return float(_non_negative(value, what, float, " of MiB"))


def _plan(item: pytest.Item) -> _Plan:
    s = _settings(item.config)
    requested = "mineru_vram_leak_check" in getattr(item, "fixturenames", ())
    check = s.leak_check or requested
    tolerance = s.tolerance_mib
    marker = item.get_closest_marker("vram_leak_check")
    if marker is not None:
        check = bool(marker.kwargs.get("enabled", marker.args[0] if marker.args else True))
        if marker.kwargs.get("tolerance_mib") is not None:
            tolerance = _mib(marker.kwargs["tolerance_mib"], f"{item.nodeid}: vram_leak_check(tolerance_mib)")
    budget = None
    budget_marker = item.get_closest_marker("vram_budget")
    if budget_marker is not None:
        raw = budget_marker.kwargs.get("mib", budget_marker.args[0] if budget_marker.args else None)
        if raw is None:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.vram_budget needs a number of MiB")
        budget = _mib(raw, f"{item.nodeid}: vram_budget")
    return _Plan(
        measure=check or requested or budget is not None,
        check_leaks=check,
        tolerance_mib=tolerance,
        budget_mib=budget,
    )


@pytest.fixture(autouse=True)
def _mineru_vram_autouse(request: pytest.FixtureRequest) -> None:
    # Autouse fixtures are set up before the test's own function-scoped fixtures and
    # torn down after them, so starting the check here brackets all of them.
    if _plan(request.node).measure:
        request.getfixturevalue("mineru_vram_leak_check")


@pytest.fixture(scope="session")
def mineru_vram_device(pytestconfig: pytest.Config) -> str:
    """The device the plugin measures: ``"cpu"`` or ``"cuda:N"`` (see ``--vram-device``)."""
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def mineru_vram_probe(mineru_vram_device: str) -> VramProbe:
    """Where the leak check reads its figures; override this fixture to measure differently."""
    from ._leakcheck import default_probe

    return default_probe(mineru_vram_device)


def _judgeable(item: pytest.Item) -> tuple[bool, str]:
    call = item.stash.get(_call_report_key, None)
    if call is None:
        return False, "leaks not judged: the test did not run (setup failed or skipped)"
    if call.failed:
        return False, "leaks not judged: the test failed, and its traceback keeps its locals alive"
    if call.skipped and hasattr(call, "wasxfail"):
        return False, "leaks not judged: the test failed as expected (xfail)"
    return True, ""


@contextlib.contextmanager
def _fixture_values_released(item: pytest.Item) -> Iterator[None]:
    """Let go of ``item.funcargs`` while measuring.

    pytest keeps every fixture value of a test in ``item.funcargs`` until the whole
    teardown phase is over (then sets it to ``None``), so a tensor that a torn-down
    fixture yielded would still look alive. Meanwhile values are held by weak
    reference; those still alive afterwards (wider-scoped fixtures, held by their
    own caches) are put back, as are plain scalars. Containers (a fixture that
    yields a tuple of tensors) cannot be weakly referenced and are not put back:
    pytest drops the dict right after this fixture's teardown anyway.
    """
    funcargs = getattr(item, "funcargs", None)
    if not isinstance(funcargs, dict):
        yield
        return
    import weakref

    scalars: dict[str, Any] = {}
    weak: dict[str, weakref.ref[Any]] = {}
    value: Any = None
    for name in list(funcargs):
        value = funcargs.pop(name)
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            scalars[name] = value
            continue
        with contextlib.suppress(TypeError):
            weak[name] = weakref.ref(value)
    del value  # the loop variable would keep the last value alive in this frame
    try:
        yield
    finally:
        funcargs.update(scalars)
        for name, ref in weak.items():
            alive = ref()
            if alive is not None:
                funcargs[name] = alive


@pytest.fixture
def mineru_vram_leak_check(request: pytest.FixtureRequest, mineru_vram_probe: VramProbe) -> Iterator[LeakCheck]:
    """Fail the test when it leaves GPU memory behind (or exceeds its ``vram_budget``).

    Yields the running :class:`~mineru_vram._leakcheck.LeakCheck` (``.before``,
    ``.current()``, ``.device``).
    """
    from ._leakcheck import LeakCheck

    item = request.node
    if _call_report_key in item.stash:  # a rerun (pytest-rerunfailures) must not see the last call
        del item.stash[_call_report_key]
    plan = _plan(item)
    check = LeakCheck(
        mineru_vram_probe,
        nodeid=item.nodeid,
        check_leaks=plan.check_leaks,
        tolerance_mib=plan.tolerance_mib,
        budget_mib=plan.budget_mib,
    )
    check.start()
    yield check
    judge, why = _judgeable(item)
    with _fixture_values_released(item):
        verdict = check.finish(judge=judge, skip_reason=why)
    peak = verdict.peak_above_start_mib
    if peak is not None:
        item.user_properties.append((PEAK_PROPERTY, round(peak, 1)))
    elif plan.budget_mib is not None:
        unchecked = next((n for n in verdict.notes if n.startswith("vram_budget")), "no peak figure")
        item.user_properties.append((UNCHECKED_PROPERTY, unchecked))
    if not verdict.ok:
        pytest.fail(verdict.message(), pytrace=False)


# --- resources for users' tests -----------------------------------------------------------------


@pytest.fixture(scope="session")
def mineru_vram_models(pytestconfig: pytest.Config) -> Path:
    """A MinerU model tree with random weights (basic tier), built once and kept.

    It lives in ``--vram-models-dir DIR`` (ini ``vram_models_dir``), else in
    ``$XDG_CACHE_HOME/mineru-vram/random-models``, the folder ``mineru-vram demo``
    uses too. The first run builds it (about 900 MB, 20-30 s); later runs, other
    processes and pytest-xdist workers reuse it (they wait while one builds).
    """
    from .testing._cache import random_models

    return random_models(_settings(pytestconfig).models_dir)


@pytest.fixture
def mineru_vram_session(mineru_vram_models: Path, mineru_vram_device: str) -> Iterator[ModelSession]:
    """An open ``ModelSession(backend="pipeline")`` on the random-weights tree and ``mineru_vram_device``.

    Closed after the test.
    """
    from ._session import ModelSession

    with ModelSession(backend="pipeline", device=mineru_vram_device, models_dir=mineru_vram_models) as session:
        yield session


@pytest.fixture
def mineru_vram_standin(tmp_path_factory: pytest.TempPathFactory, mineru_vram_device: str) -> Iterator[StandinServer]:
    """The SGLang stand-in server on a free loopback port, with an API key; killed after.

    It answers like ``sglang.launch_server`` (``/health``, ``/v1/models``,
    ``/v1/chat/completions`` with canned MinerU answers, ``/release_memory_occupation``
    ...) and, where torch sees a GPU, holds up to 1 GiB on ``mineru_vram_device`` as
    SGLang's static pool would. Yields an object with ``url``, ``api_key``, ``pid``,
    ``headers()`` and ``log_tail()``.
    """
    import secrets

    from .testing._plugin_support import StandinServer

    folder = tmp_path_factory.mktemp("sglang-standin")
    model_path = folder / "model"
    model_path.mkdir()
    server = StandinServer(
        model_path=model_path,
        api_key=secrets.token_hex(16),
        device=mineru_vram_device,
        extra_args=["--enable-memory-saver"],
        log_dir=folder,
    )
    with server:
        yield server

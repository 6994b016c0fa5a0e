"""The pytest plugin (``mineru_vram.pytest_plugin``), driven as users drive it: in a pytest subprocess.

The leak-judging logic is exercised on any machine through two sources: a scripted
probe with GPU-like figures (``FAKE_PROBE``, overriding the ``mineru_vram_probe`` fixture)
and the real census of live CPU tensors (``--vram-device cpu``), which needs no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mineru_vram import _leakcheck
from mineru_vram._leakcheck import LeakCheck, Reading

pytest_plugins = ["pytester"]

MIB = 1024 * 1024

# A probe whose figures the inner tests script: what a test adds stays "on the device".
FAKE_PROBE = """
import pytest
from mineru_vram._leakcheck import Reading

MIB = 1024 * 1024


class FakeProbe:
    device = "cuda:0"

    def __init__(self):
        self.allocated = 0
        self.process_mib = 600.0
        self.peak = 0
        self.cuda = True
        self.floor = None

    def describe(self):
        return "cuda:0 (fake GPU)"

    def settle(self):
        pass

    def read(self):
        return Reading(
            device="cuda:0", gpu_available=True, allocated_bytes=self.allocated,
            reserved_bytes=self.allocated, process_mib=self.process_mib, cuda_initialized=self.cuda,
        )

    def start_peak(self):
        self.peak = self.allocated

    def stop_peak(self):
        return max(self.peak, self.allocated)

    def context_floor(self):
        return self.floor


@pytest.fixture(scope="session")
def mineru_vram_probe():
    return FakeProbe()
"""


def _inner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The inner runs must not see an outer xdist worker name or leak check settings.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)


@pytest.fixture
def fake_gpu(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    _inner_env(monkeypatch)
    pytester.makeconftest(FAKE_PROBE)
    return pytester


@pytest.fixture
def cpu_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    _inner_env(monkeypatch)
    return pytester


# --- loading ------------------------------------------------------------------------------------


def test_plugin_module_imports_only_pytest_and_the_standard_library() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        import pytest
        before = set(sys.modules)
        import mineru_vram.pytest_plugin
        new = sorted(set(sys.modules) - before)
        foreign = [m for m in new if m.split(".")[0] not in sys.stdlib_module_names
                   and m.split(".")[0] != "mineru_vram"]
        print(json.dumps([foreign, "mineru_vram._leakcheck" in new]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    foreign, heavy_logic_loaded = json.loads(out.strip().splitlines()[-1])
    assert foreign == []
    assert heavy_logic_loaded is False


def test_plugin_is_registered_and_never_imports_torch(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile(
        """
        import sys

        def test_first():
            pass

        def test_torch_and_mineru_were_never_imported():
            assert "torch" not in sys.modules
            assert not any(m == "mineru" or m.startswith("mineru.") for m in sys.modules)
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-leak-check", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["mineru-vram: *leak check on for every test*", "*plugins:*mineru-vram*"])


def test_report_header_names_device_and_settings_and_reports_no_gpu(
    cpu_run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for the inner run, on any machine
    cpu_run.makepyfile("def test_nothing():\n    pass\n")
    result = cpu_run.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["mineru-vram: no GPU (*); checking live CPU tensors; leak check off*"])
    result = cpu_run.runpytest_subprocess("--vram-leak-check", "--vram-leak-tolerance-mib", "48")
    result.stdout.fnmatch_lines(["mineru-vram: no GPU (*leak check on for every test, NVML tolerance 48 MiB"])


def test_bad_settings_are_usage_errors(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile("def test_nothing():\n    pass\n")
    result = cpu_run.runpytest_subprocess("--vram-device", "gpu0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--vram-device: unsupported device 'gpu0'*"])
    cpu_run.makeini("[pytest]\nvram_leak_tolerance_mib = lots\n")
    result = cpu_run.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini vram_leak_tolerance_mib='lots': expected a number*"])


# --- the CPU census: real tensors ----------------------------------------------------------------


def test_cpu_census_fails_a_leaking_test_and_passes_a_clean_one(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile(
        """
        import torch

        KEEP = []
        EXISTING = torch.ones(64)

        def test_clean():
            x = torch.zeros(4096, 256)
            y = (x + 1).sum()
            del x, y
            KEEP.append(EXISTING[:8])   # a view of memory that existed before: no new memory

        def test_leaky():
            KEEP.append(torch.zeros(256, 1024))         # 1 MiB
            KEEP.append(KEEP[-1][:10])                  # a view of it: the same memory
            KEEP.append(torch.zeros(3, 5, dtype=torch.float64))
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-leak-check", "--vram-device", "cpu")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaky*",
            "VRAM leak in test_*.py::test_leaky on cpu: 2 tensor(s) created by the test are still alive (1.0 MiB)",
            "  live tensors on cpu created by the test: 2, 1.0 MiB in total; "
            "largest: float32[256, 1024] 1.0 MiB, float64[3, 5] 120 B",
        ]
    )
    assert "test_clean" not in "".join(line for line in result.outlines if "VRAM leak" in line)


def test_fixture_checks_only_the_tests_that_request_it(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile(
        """
        import torch

        KEEP = []

        def test_unchecked_leak():
            KEEP.append(torch.zeros(1000))

        def test_checked_leak(mineru_vram_leak_check):
            assert mineru_vram_leak_check.device == "cpu"
            assert mineru_vram_leak_check.before is not None
            KEEP.append(torch.zeros(1000))
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-device", "cpu")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["VRAM leak in test_*::test_checked_leak on cpu: 1 tensor(s)*"])
    assert "test_unchecked_leak on cpu" not in result.stdout.str()


def test_markers_opt_in_and_opt_out(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile(
        """
        import pytest
        import torch

        KEEP = []

        @pytest.mark.vram_leak_check
        def test_opted_in():
            KEEP.append(torch.zeros(10))

        @pytest.mark.vram_leak_check(enabled=False)
        def test_opted_out():
            KEEP.append(torch.zeros(10))
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-device", "cpu")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["VRAM leak in *::test_opted_in on cpu*"])
    result = cpu_run.runpytest_subprocess("--vram-device", "cpu", "--vram-leak-check")
    result.assert_outcomes(passed=2, errors=1)  # the global option does not override enabled=False
    assert "test_opted_out on cpu" not in result.stdout.str()


def test_ini_twin_turns_the_check_on(cpu_run: pytest.Pytester) -> None:
    cpu_run.makeini("[pytest]\nvram_leak_check = true\nvram_device = cpu\n")
    cpu_run.makepyfile(
        """
        import torch

        KEEP = []

        def test_leaky():
            KEEP.append(torch.zeros(10))
        """
    )
    result = cpu_run.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["VRAM leak in *::test_leaky on cpu*"])


def test_a_failing_test_is_not_also_reported_as_a_leak(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile(
        """
        import torch

        def test_fails_holding_a_tensor():
            x = torch.zeros(1000)
            assert x.sum() == 1
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-leak-check", "--vram-device", "cpu")
    result.assert_outcomes(failed=1)
    assert "VRAM leak" not in result.stdout.str()


def test_leak_held_by_a_function_fixture_is_judged_after_its_teardown(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile(
        """
        import pytest
        import torch

        CACHE = []

        @pytest.fixture
        def weights():
            w = torch.zeros(512, 512)
            yield w            # held while the test runs: not a leak

        @pytest.fixture
        def leaky_weights():
            w = torch.zeros(256, 256)
            CACHE.append(w)    # still referenced after teardown: a leak
            yield w

        def test_holds(weights):
            assert weights.shape == (512, 512)

        def test_leaks(leaky_weights):
            assert leaky_weights.shape == (256, 256)
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-leak-check", "--vram-device", "cpu")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["VRAM leak in *::test_leaks on cpu: 1 tensor(s) * (256.0 KiB)"])


# --- GPU-like figures from a scripted probe ------------------------------------------------------


def test_torch_allocated_may_not_grow_at_all(fake_gpu: pytest.Pytester) -> None:
    fake_gpu.makepyfile(
        """
        def test_clean(mineru_vram_probe):
            mineru_vram_probe.peak = 200 * 1024 * 1024   # a transient peak, given back

        def test_one_byte(mineru_vram_probe):
            mineru_vram_probe.allocated += 1

        def test_planted_64_mib(mineru_vram_probe):
            mineru_vram_probe.allocated += 64 * 1024 * 1024
            mineru_vram_probe.process_mib += 64
        """
    )
    result = fake_gpu.runpytest_subprocess("--vram-leak-check")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "VRAM leak in *::test_one_byte on cuda:0: torch allocated grew by 1 B (0 B -> 1 B)",
            "  torch allocated on cuda:0: 0 B -> 1 B (reserved 1 B)",
            "  NVML this process: 600.0 MiB -> 600.0 MiB (+0.0 MiB, tolerance 32 MiB)",
            "VRAM leak in *::test_planted_64_mib on cuda:0: torch allocated grew by 64.0 MiB (1 B -> 64.0 MiB); "
            "NVML process memory grew by 64.0 MiB (600.0 -> 664.0 MiB), 64.0 MiB above the start, "
            "over the tolerance of 32 MiB",
        ]
    )


def test_nvml_tolerance_from_option_ini_and_marker(fake_gpu: pytest.Pytester) -> None:
    fake_gpu.makepyfile(
        """
        import pytest

        def test_nvml_grows_40(mineru_vram_probe):
            mineru_vram_probe.process_mib += 40    # e.g. a library's pool outside torch's allocator

        @pytest.mark.vram_leak_check(tolerance_mib=50)
        def test_nvml_grows_40_with_marker(mineru_vram_probe):
            mineru_vram_probe.process_mib += 40
        """
    )
    result = fake_gpu.runpytest_subprocess("--vram-leak-check")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["VRAM leak in *::test_nvml_grows_40 on cuda:0: NVML process memory grew by 40.0 MiB*tolerance of 32 MiB"]
    )
    result = fake_gpu.runpytest_subprocess("--vram-leak-check", "--vram-leak-tolerance-mib", "45")
    result.assert_outcomes(passed=2)
    fake_gpu.makeini("[pytest]\nvram_leak_tolerance_mib = 45\n")
    result = fake_gpu.runpytest_subprocess("--vram-leak-check")
    result.assert_outcomes(passed=2)
    result = fake_gpu.runpytest_subprocess("--vram-leak-check", "--vram-leak-tolerance-mib", "10")
    result.assert_outcomes(passed=2, errors=1)  # the option beats the ini; the marker beats both
    result.stdout.fnmatch_lines(["VRAM leak in *::test_nvml_grows_40 on cuda:0: *over the tolerance of 10 MiB"])


def test_nvml_growth_of_a_new_cuda_context_is_judged_against_the_bare_context_floor(
    fake_gpu: pytest.Pytester,
) -> None:
    fake_gpu.makepyfile(
        """
        def test_creates_context(mineru_vram_probe):
            mineru_vram_probe.cuda = False
            mineru_vram_probe.process_mib = 0.0
            mineru_vram_probe.floor = 520.0

        def test_first_cuda_use(mineru_vram_probe):
            mineru_vram_probe.cuda = True
            mineru_vram_probe.process_mib = 530.0      # the context: within floor + tolerance

        def test_context_plus_leak(mineru_vram_probe):
            mineru_vram_probe.process_mib = 700.0      # 170 MiB above the floor
        """
    )
    result = fake_gpu.runpytest_subprocess("--vram-leak-check", "-p", "no:randomly")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["VRAM leak in *::test_context_plus_leak on cuda:0: NVML process memory grew by 170.0 MiB*"]
    )
    assert "test_first_cuda_use on" not in result.stdout.str()


def test_vram_budget_marker_and_heaviest_tests_summary(fake_gpu: pytest.Pytester) -> None:
    fake_gpu.makepyfile(
        """
        import pytest

        @pytest.mark.vram_budget(100)
        def test_over_budget(mineru_vram_probe):
            mineru_vram_probe.peak = 120 * 1024 * 1024

        @pytest.mark.vram_budget(mib=200)
        def test_within_budget(mineru_vram_probe):
            mineru_vram_probe.peak = 150 * 1024 * 1024

        def test_light(mineru_vram_probe):
            mineru_vram_probe.peak = 10 * 1024 * 1024

        def test_unmeasured(mineru_vram_probe):
            mineru_vram_probe.peak = 999 * 1024 * 1024
        """
    )
    result = fake_gpu.runpytest_subprocess("--vram-top", "3", "-p", "no:randomly")
    # Without --vram-leak-check only the budget tests are measured; nothing is judged a leak.
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "VRAM budget exceeded in *::test_over_budget on cuda:0: peak 120.0 MiB above the start "
            "(torch allocated) exceeds vram_budget(100 MiB)",
            "*mineru-vram: heaviest tests by peak VRAM*",
            "     150.0 MiB  *::test_within_budget",
            "     120.0 MiB  *::test_over_budget",
        ]
    )
    assert "test_unmeasured" not in result.stdout.str().split("heaviest tests")[1]
    result = fake_gpu.runpytest_subprocess("--vram-top", "2", "--vram-leak-check", "-p", "no:randomly")
    result.stdout.fnmatch_lines(
        [
            "*heaviest tests by peak VRAM*",
            "     999.0 MiB  *::test_unmeasured",
            "     150.0 MiB  *::test_within_budget",
            "=*short test summary info*",
        ]
    )
    result = fake_gpu.runpytest_subprocess("--vram-top", "0", "--vram-leak-check")
    result.assert_outcomes(passed=4, errors=1)
    assert "heaviest tests" not in result.stdout.str()


def test_vram_budget_without_a_gpu_reports_no_gpu_instead_of_failing(cpu_run: pytest.Pytester) -> None:
    cpu_run.makepyfile(
        """
        import pytest

        @pytest.mark.vram_budget(1)
        def test_budgeted():
            pass

        @pytest.mark.vram_budget
        def test_no_number():
            pass
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-device", "cpu", "-k", "budgeted")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*mineru-vram: vram_budget not checked*", "*::test_budgeted: vram_budget(1) not checked: no GPU (*)"]
    )
    result = cpu_run.runpytest_subprocess("--vram-device", "cpu", "-k", "no_number")
    result.stdout.fnmatch_lines(["*vram_budget needs a number of MiB*"])
    assert result.ret != 0


def test_gpu_marker_is_skipped_by_the_nvml_probe(cpu_run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu_run.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            raise AssertionError("must not run without a GPU")

        def test_plain():
            pass
        """
    )
    result = cpu_run.runpytest_subprocess("-rs", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * no GPU: *"])


# --- devices and xdist ---------------------------------------------------------------------------


def test_worker_device_maps_workers_onto_gpus_modulo_the_count() -> None:
    assert _leakcheck.worker_device("gw0", 4) == "cuda:0"
    assert _leakcheck.worker_device("gw1", 4) == "cuda:1"
    assert _leakcheck.worker_device("gw5", 4) == "cuda:1"
    assert _leakcheck.worker_device("gw3", 1) == "cuda:0"
    assert _leakcheck.worker_device("gw2", 0) == "cpu"
    assert _leakcheck.worker_device(None, 4) is None
    assert _leakcheck.worker_device("master", 4) is None


def test_per_worker_device_follows_the_xdist_worker_name(
    cpu_run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_run.makepyfile(
        """
        def test_device(mineru_vram_device):
            print("DEVICE=" + mineru_vram_device)
        """
    )
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = cpu_run.runpytest_subprocess("--vram-per-worker-device", "--vram-device", "cuda:1", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*DEVICE=cpu*"])  # per worker beats --vram-device; no GPU gives cpu
    result = cpu_run.runpytest_subprocess("--vram-device", "cuda:1", "-s")
    result.stdout.fnmatch_lines(["mineru-vram: cuda:1: no GPU*", "*DEVICE=cuda:1*"])


def test_under_xdist_peaks_reach_the_controller_summary(fake_gpu: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    fake_gpu.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("mib", [10, 20, 30, 40])
        def test_peak(mineru_vram_probe, mib, mineru_vram_device):
            mineru_vram_probe.peak = mib * 1024 * 1024
        """
    )
    result = fake_gpu.runpytest_subprocess("-n", "2", "--vram-leak-check", "--vram-per-worker-device")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        ["*heaviest tests*", "*40.0 MiB  *test_peak[[]40[]]", "*30.0 MiB  *", "*20.0 MiB  *", "*10.0 MiB  *"]
    )


# --- resource fixtures ---------------------------------------------------------------------------


def test_standin_fixture_serves_with_its_key_and_is_killed_after(cpu_run: pytest.Pytester) -> None:
    pid_file = cpu_run.path / "standin.json"
    cpu_run.makepyfile(
        f"""
        import json, os, urllib.error, urllib.request
        import psutil
        import pytest

        def test_standin(mineru_vram_standin):
            server = psutil.Process(mineru_vram_standin.pid)
            with open({str(pid_file)!r}, "w") as fh:
                json.dump({{"pid": mineru_vram_standin.pid, "pgid": mineru_vram_standin.pgid,
                           "cwd": server.cwd(), "test_cwd": os.getcwd()}}, fh)
            assert mineru_vram_standin.url.startswith("http://127.0.0.1:")
            assert os.getpgid(mineru_vram_standin.pid) == mineru_vram_standin.pgid != os.getpgid(0)
            req = urllib.request.Request(mineru_vram_standin.url + "/v1/models", headers=mineru_vram_standin.headers())
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert resp.status == 200
                assert json.load(resp)["data"]
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(mineru_vram_standin.url + "/v1/models", timeout=5)
            assert info.value.code == 401
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-device", "cpu")
    result.assert_outcomes(passed=1)
    seen = json.loads(pid_file.read_text())
    assert seen["cwd"] != seen["test_cwd"]  # a private working folder, not the one pytest runs in
    assert oct(os.stat(seen["cwd"]).st_mode & 0o777) == oct(0o700)
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(seen["pgid"], 0)


def test_plugin_fixtures_do_not_clash_with_a_suites_own_names(cpu_run: pytest.Pytester) -> None:
    # A suite that already has fixtures with the short names the plugin once used keeps them,
    # and the plugin's own fixtures (and the leak check built on them) are unaffected.
    cpu_run.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def vram_device():
            return "the suite's own"

        @pytest.fixture(scope="session")
        def vram_probe():
            raise AssertionError("the plugin must not use the suite's vram_probe")

        @pytest.fixture
        def random_models():
            return "the suite's own"

        @pytest.fixture
        def model_session():
            return "the suite's own"
        """
    )
    cpu_run.makepyfile(
        """
        def test_both(vram_device, random_models, model_session, mineru_vram_device, mineru_vram_probe):
            assert vram_device == random_models == model_session == "the suite's own"
            assert mineru_vram_device == "cpu"
            assert mineru_vram_probe.device == "cpu"
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-device", "cpu", "--vram-leak-check")
    result.assert_outcomes(passed=1)


def _complete_tree(root: Path) -> Path:
    """A folder that write_random_models takes as a complete seed-0 tree (a manifest, one file)."""
    from mineru_vram.testing import _models

    (root / _models._REPO_NAME).mkdir(parents=True)
    (root / _models._REPO_NAME / "weights").write_bytes(b"12345")
    manifest = {**_models._manifest_header(0), "files": {f"{_models._REPO_NAME}/weights": 5}}
    _models._write_json_atomic(root / _models._MANIFEST_NAME, manifest)
    return root


def test_models_fixture_uses_the_shared_cache_or_the_folder_given(
    cpu_run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "xdg-cache"
    shared = _complete_tree(cache / "mineru-vram" / "random-models")
    given = _complete_tree(tmp_path / "given")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    cpu_run.makepyfile(
        """
        def test_where(mineru_vram_models):
            print("MODELS=" + str(mineru_vram_models))
        """
    )
    result = cpu_run.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*MODELS={shared}"])
    result = cpu_run.runpytest_subprocess("-s", "--vram-models-dir", str(given))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*MODELS={given}"])
    assert not (given / "MinerU-4_models_torch" / "Layout").exists()  # reused, never rebuilt


def test_one_cache_folder_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mineru_vram.testing import _cache, _models

    builds: list[Path] = []

    def build(repo: Path, seed: int) -> None:
        builds.append(repo)
        repo.mkdir(parents=True)
        (repo / "weights").write_bytes(b"w")

    monkeypatch.setattr(_models, "_build_model_tree", build)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "mineru-vram" / "random-models"
    assert _cache.default_models_dir() == expected
    assert _cache.random_models() == expected
    assert _cache.random_models() == expected
    assert len(builds) == 1
    assert (expected / _models._LOCK_NAME).is_file()  # built under the tree's lock
    assert _cache.random_models(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert len(builds) == 2
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as XDG asks
    assert _cache.default_models_dir() == Path.home() / ".cache" / "mineru-vram" / "random-models"


def test_model_session_fixture_opens_on_the_random_tree_and_leaves_no_tensors(
    random_models_dir: Path, cpu_run: pytest.Pytester
) -> None:
    # random_models_dir (the suite's shared tree) is a session fixture, so it is set up before
    # pytester points HOME at its own folder and before it snapshots sys.modules.
    models = random_models_dir
    cpu_run.makeconftest(
        f"""
        import pytest
        from pathlib import Path

        @pytest.fixture(scope="session")
        def mineru_vram_models():
            return Path({str(models)!r})
        """
    )
    cpu_run.makepyfile(
        """
        from mineru_vram import SessionState

        def test_session(mineru_vram_session):
            assert mineru_vram_session.state is SessionState.OPENED
            assert mineru_vram_session.device == "cpu"
            assert mineru_vram_session.backend == "pipeline"
        """
    )
    result = cpu_run.runpytest_subprocess("--vram-leak-check", "--vram-device", "cpu", timeout=600)
    result.assert_outcomes(passed=1)


# --- the checker in-process -------------------------------------------------------------------------


class _ScriptedProbe:
    """Readings from a list, for LeakCheck's settling and judging without pytest."""

    device = "cuda:0"

    def __init__(self, readings: list[Reading], peak: int | None = None, floor: float | None = None) -> None:
        self.readings = readings
        self.peak = peak
        self.floor = floor
        self.settled = 0

    def describe(self) -> str:
        return "scripted"

    def settle(self) -> None:
        self.settled += 1

    def read(self) -> Reading:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]

    def start_peak(self) -> None:
        pass

    def stop_peak(self) -> int | None:
        return self.peak

    def context_floor(self) -> float | None:
        return self.floor


def _r(allocated: int = 0, process: float = 600.0, cuda: bool = True) -> Reading:
    return Reading("cuda:0", True, allocated_bytes=allocated, process_mib=process, cuda_initialized=cuda)


def test_settling_rereads_until_two_readings_agree() -> None:
    # NVML lags a free: 700 -> 650 -> 600 -> 600; the check must wait for the last one.
    probe = _ScriptedProbe([_r(process=600), _r(process=600), _r(process=700), _r(process=650), _r(process=600)])
    check = LeakCheck(probe, settle_interval=0, tolerance_mib=10)
    check.start()
    probe.readings = [_r(process=700), _r(process=650), _r(process=600), _r(process=600)]
    verdict = check.finish()
    assert verdict.after.process_mib == 600
    assert verdict.ok, verdict.message()
    assert probe.settled == 2


def test_unsettled_growth_within_the_read_limit_is_a_leak() -> None:
    probe = _ScriptedProbe([_r(process=600)])
    check = LeakCheck(probe, settle_interval=0, settle_reads=2, tolerance_mib=10)
    check.start()
    probe.readings = [_r(process=700), _r(process=650), _r(process=600)]
    verdict = check.finish()
    assert verdict.after.process_mib == 650
    assert not verdict.ok
    assert "NVML process memory grew by 50.0 MiB" in verdict.message()


def test_checker_rejects_negative_settings() -> None:
    probe = _ScriptedProbe([_r()])
    with pytest.raises(ValueError, match="tolerance_mib"):
        LeakCheck(probe, tolerance_mib=-1)
    with pytest.raises(ValueError, match="budget_mib"):
        LeakCheck(probe, budget_mib=-5)
    with pytest.raises(RuntimeError, match="before start"):
        LeakCheck(probe).finish()


def test_census_counts_new_storages_not_views_or_survivors() -> None:
    torch = pytest.importorskip("torch")
    old = torch.zeros(1000)
    base = _leakcheck.take_census_baseline("cpu")
    view_of_old = old[10:20]
    fresh = torch.ones(2, 3, 4)
    fresh_view = fresh[0]
    found = _leakcheck.tensors_created_since(base, "cpu")
    assert found.count == 1
    assert found.total_bytes == fresh.untyped_storage().nbytes()
    assert [str(t) for t in found.largest] == ["float32[2, 3, 4] 96 B"]
    del fresh, fresh_view, view_of_old, old
    assert _leakcheck.tensors_created_since(base, "cpu").count == 0

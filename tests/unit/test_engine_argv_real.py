"""Our SGLang and vLLM command lines, read by sglang's and vllm's own argument parsers.

The command line, key file and environment each test checks are the ones the
engine really builds: a :class:`ResidentEngine` is started with a launcher that
records what it was handed (argv, environment, the ``--config`` key file, the
ledger's reservation at that moment) and refuses to run it. Nothing is launched.

Two kinds of test:

* **Real parsers** (skipped where the package is not importable). sglang 0.5.23's
  ``prepare_server_args`` and vllm 0.33.0's ``vllm serve`` parser run in a child
  Python (``python -c``, this interpreter, this ``PYTHONPATH``), so their imports,
  logging set-up and warnings never touch this test process. They also give the
  ``server_args`` line SGLang logs (our log tails must redact its key) and the routes
  vLLM's dev mode mounts, with the paths its key guards. Neither needs a GPU:
  a ``pip install --no-deps --target DIR`` of each wheel plus a few light
  dependencies imports on CPU with this project's torch (see
  ``docs/notes/sglang-vllm-findings.md`` for the exact lists), then
  ``PYTHONPATH=DIR pytest tests/unit/test_engine_argv_real.py``.
* **Pure** (run everywhere): SGLang's ``--config``-to-argv rule, copied below from
  sglang 0.5.23, applied to 10,000 keys of real engines and to a key that begins
  with ``-``; and the key file SGLang reads. (The flags and the admission figure
  are also checked without the parsers, in ``test_engine_config.py``.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mineru_vram._budget import Ledger, device_key
from mineru_vram._engine import ResidentEngine
from mineru_vram._engine.backends.server import REDACTED, redact
from mineru_vram._probe import DeviceMemory

MINERU_LOGITS_PROCESSOR = "mineru_vl_utils:MinerULogitsProcessor"  # what mineru/kit/vlm_server/vllm_server.py passes
CHILD_START_TIMEOUT = 600.0  # importing vllm on a busy two-core CPU machine took 25 s; leave room
CHILD_ANSWER_TIMEOUT = 120.0


# --- SGLang's --config rule, copied ----------------------------------------------------------------


def sglang_config_to_argv(config: Mapping[str, Any], store_true: frozenset[str] = frozenset()) -> list[str]:
    """SGLang's conversion of a ``--config`` YAML mapping into argv, as sglang 0.5.23 does it.

    Copied from ``sglang/srt/utils/server_args_config_parser.py``,
    ``ConfigArgumentMerger._convert_config_to_args`` and its ``_add_boolean_arg``,
    ``_add_list_arg`` and ``_add_scalar_arg``: every key becomes ``--key`` and a
    scalar value becomes the next argv item as ``str(value)``, with no ``--key=value``
    form, so a value that starts with ``-`` reads to argparse as an option.
    (``test_our_copy_of_sglangs_config_rule_matches_sglang`` checks this copy
    against the real one where sglang is importable.)

    Args:
        config: the YAML mapping (``yaml.safe_load`` of the file).
        store_true: the ``dest`` names (underscored) of SGLang's ``store_true`` flags.
    """
    argv: list[str] = []
    for key, value in config.items():
        if isinstance(value, bool):
            if key.replace("-", "_") in store_true:
                if value:
                    argv.append(f"--{key}")
            else:
                argv.extend([f"--{key}", str(value).lower()])
        elif isinstance(value, list):
            if value:
                argv.append(f"--{key}")
                argv.extend(str(item) for item in value)
        elif isinstance(value, dict):
            argv.extend([f"--{key}", json.dumps(value)])
        else:
            argv.extend([f"--{key}", str(value)])
    return argv


def sglang_merge_config(argv: Sequence[str]) -> list[str]:
    """``ConfigArgumentMerger.merge_config_with_args`` (same file): the file's argv first, then the rest.

    Also its ``_validate_yaml_file`` (a ``.yaml``/``.yml`` suffix) and ``_parse_yaml_config``
    (``yaml.safe_load``, a mapping at the root).
    """
    argv = list(argv)
    at = argv.index("--config")
    path = Path(argv[at + 1])
    assert path.suffix.lower() in (".yaml", ".yml"), f"SGLang refuses a config file named {path.name}"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(config, dict), "SGLang wants a mapping at the root of the config file"
    return sglang_config_to_argv(config) + argv[:at] + argv[at + 2 :]


def _api_key_parser() -> argparse.ArgumentParser:
    # SGLang registers api_key (arg_groups/fields/serving.py, Optional[str]) as a plain store action.
    parser = argparse.ArgumentParser(prog="sglang serve", exit_on_error=False)
    parser.add_argument("--api-key")
    return parser


def _parsed_key(argv: Sequence[str]) -> str | None:
    """The ``--api-key`` argparse reads from ``argv``; raises ``ValueError`` with argparse's words if it exits."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, _ = _api_key_parser().parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ValueError(str(exc)) from exc
    except SystemExit as exc:
        raise ValueError(err.getvalue().strip() or f"argparse exited {exc.code}") from exc
    key = args.api_key
    return None if key is None else str(key)


# --- engines started with a launcher that runs nothing ---------------------------------------------


class _Launched(Exception):
    """Raised by :class:`CapturingLauncher` once it has recorded the launch."""


@dataclass
class Launch:
    """What the engine handed its launcher."""

    argv: list[str]
    env: dict[str, str] = field(repr=False)  # this process's whole environment: kept out of reports
    config_path: Path | None = None
    config_text: str | None = field(default=None, repr=False)
    config_mode: int | None = None
    ledger_need_mib: list[float] = field(default_factory=list)


class CapturingLauncher:
    """A ``launcher=`` that records the command line, environment and key file, and runs nothing."""

    def __init__(self, ledger: Ledger | None = None, device: str = "cuda:0") -> None:
        self.ledger = ledger
        self.device = device
        self.launches: list[Launch] = []

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path) -> Any:
        launch = Launch(argv=list(argv), env=dict(env))
        if "--config" in launch.argv:
            path = Path(launch.argv[launch.argv.index("--config") + 1])
            launch.config_path = path
            launch.config_text = path.read_text(encoding="utf-8")
            launch.config_mode = stat.S_IMODE(path.stat().st_mode)
        if self.ledger is not None:
            launch.ledger_need_mib = sorted(e.need_mib for e in self.ledger.snapshot(device_key(self.device)))
        self.launches.append(launch)
        raise _Launched


def card(total_gib: float = 80.0) -> Callable[[str], DeviceMemory]:
    """A stand-in NVML probe: one empty card of this size."""
    info = DeviceMemory(
        index=0, name="Stand-in H100", total_mib=total_gib * 1024, used_mib=0.0, free_mib=total_gib * 1024
    )
    return lambda device: info


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "MinerU2.5-tiny"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    return folder


@pytest.fixture
def engines() -> Iterator[list[ResidentEngine]]:
    made: list[ResidentEngine] = []
    yield made
    for engine in made:
        engine.stop()


@pytest.fixture
def launched(
    engines: list[ResidentEngine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[ResidentEngine, Launch]]:
    """Build an engine, start it with a :class:`CapturingLauncher`, return it and what it would run.

    The engine is kept (stopped at teardown) so its runtime folder and key file stay readable.
    """
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # cuda:N is the machine's GPU N

    def make(engine: str, **kwargs: Any) -> tuple[ResidentEngine, Launch]:
        device = kwargs.setdefault("device", "cuda:0")
        ledger = Ledger(tmp_path / "ledger")
        launcher = CapturingLauncher(ledger, device=device)
        if device != "cpu":
            kwargs.setdefault("probe", card())
        built = ResidentEngine(
            engine,  # type: ignore[arg-type]
            runtime_dir=tmp_path / f"runtime-{len(engines)}",
            launcher=launcher,
            ledger=ledger,
            **kwargs,
        )
        engines.append(built)
        with pytest.raises(_Launched):
            built.start()
        return built, launcher.launches[-1]

    return make


def _port(engine: ResidentEngine) -> int:
    port = urlsplit(engine.vlm_config()["server_url"]).port
    assert port is not None
    return port


def _dash_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next ``secrets.token_urlsafe`` call return a key that starts with ``-`` (1 in 64 do)."""
    real = secrets.token_urlsafe
    first = [True]

    def token_urlsafe(nbytes: int | None = None) -> str:
        key = real(nbytes)
        if first.pop() if first else False:
            return "-" + key[1:]
        return key

    monkeypatch.setattr(secrets, "token_urlsafe", token_urlsafe)


# --- the real parsers, in a child Python -----------------------------------------------------------

_CHILD = r"""
import contextlib, io, json, os, sys, warnings

warnings.simplefilter("ignore")
_out = os.dup(1)
os.dup2(2, 1)  # whatever the packages print goes to stderr; answers keep the real stdout


def answer(obj):
    os.write(_out, (json.dumps(obj, default=repr) + "\n").encode())


def parse(function, argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return function(argv), None
    except SystemExit as exc:
        said = err.getvalue()
        lines = [line for line in said.splitlines() if "error:" in line]  # argparse's message, not its usage
        return None, {"ok": False, "exit": exc.code, "error": "\n".join(lines) or said[-3000:]}
    except Exception as exc:
        return None, {"ok": False, "exit": None, "error": repr(exc)}


kind = sys.argv[1]
try:
    from importlib.metadata import version

    if kind == "sglang":
        import argparse

        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import ServerArgs, prepare_server_args
        from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger
        from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

        load_plugins()  # what python -m sglang.launch_server does before prepare_server_args
    else:
        from vllm import platforms
        from vllm.platforms.cpu import CpuPlatform

        if platforms.current_platform.is_unspecified():
            # No GPU here: what vllm's own `bench` subcommand does (vllm/entrypoints/cli/main.py).
            platforms.current_platform = CpuPlatform()
        import vllm.envs as envs
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.cli import serve
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns

        # vllm/entrypoints/cli/main.py: the `vllm` parser with its `serve` subcommand.
        parser = FlexibleArgumentParser(description="vLLM CLI")
        subparsers = parser.add_subparsers(required=False, dest="subparser")
        commands = {}
        for command in serve.cmd_init():
            command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
            commands[command.name] = command
except ImportError as exc:
    answer({"skip": f"{kind} cannot be imported by {sys.executable}: {exc!r}"})
    sys.exit(0)
answer({"ready": kind, "version": version(kind)})

for line in sys.stdin:
    ask = json.loads(line)
    op = ask["op"]
    if kind == "sglang" and op == "parse":
        args, failed = parse(prepare_server_args, ask["argv"])
        answer(failed or {"ok": True, "fields": {name: getattr(args, name, "<absent>") for name in ask["fields"]}})
    elif kind == "sglang" and op == "log_line":
        # sglang/srt/entrypoints/engine.py logs f"server_args={_server_args_for_logging(server_args)}", where
        # _server_args_for_logging(a) is redact_watermark_secrets(a.resolved_dict()) (that module needs uvloop).
        from sglang.srt.sampling.watermarking.core import redact_watermark_secrets

        args, failed = parse(prepare_server_args, ask["argv"])
        answer(failed or {"ok": True, "line": f"server_args={redact_watermark_secrets(args.resolved_dict())}"})
    elif kind == "vllm" and op == "routes":
        # What VLLM_SERVER_DEV_MODE mounts (launchers/api_server/routers.py), and the key's reach.
        import inspect
        from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX
        from vllm.entrypoints.serve.dev.sleep import api_router as sleep_router
        from vllm.entrypoints.serve.dev.rpc import api_router as rpc_router
        from vllm.entrypoints.rl.online import api_router as rl_router

        answer({"ok": True, "guarded": list(GUARDED_PREFIX), "sleep_file": inspect.getfile(sleep_router),
                "dev": sorted(r.path for m in (sleep_router, rpc_router, rl_router) for r in m.router.routes)})
    elif kind == "sglang" and op == "convert":
        parser = argparse.ArgumentParser(prog="sglang serve")
        ServerArgs.add_cli_args(parser)
        merger = ConfigArgumentMerger(parser)
        answer({"ok": True, "argv": merger._convert_config_to_args(ask["config"]),
                "store_true": sorted(merger.store_true_actions)})
    elif op == "request":
        request = ChatCompletionRequest.model_validate(ask["body"])
        if kind == "sglang":
            answer({"ok": True, "dump": request.model_dump(mode="json")})
        else:
            params = request.to_sampling_params(ask["max_tokens"], {})
            answer({"ok": True, "extra_args": params.extra_args})
    elif kind == "vllm" and op == "parse":
        for name in ("VLLM_API_KEY", "VLLM_SERVER_DEV_MODE"):
            if name in ask["env"]:
                os.environ[name] = ask["env"][name]
            else:
                os.environ.pop(name, None)
        args, failed = parse(parser.parse_args, ask["argv"])
        if failed:
            answer(failed)
            continue
        try:
            commands[args.subparser].validate(args)
            args.model = args.model_tag  # ServeSubcommand.cmd: the positional model wins
            engine_args = AsyncEngineArgs.from_cli_args(args)
            loaded = [f"{c.__module__}:{c.__qualname__}"
                      for c in _load_logitsprocs_by_fqcns(engine_args.logits_processors)]
        except Exception as exc:
            answer({"ok": False, "exit": None, "error": repr(exc)})
            continue
        answer({
            "ok": True,
            "fields": {name: getattr(args, name, "<absent>") for name in ask["fields"]},
            "engine": {
                "model": engine_args.model,
                "gpu_memory_utilization": engine_args.gpu_memory_utilization,
                "enable_sleep_mode": engine_args.enable_sleep_mode,
                "logits_processors": engine_args.logits_processors,
            },
            # vllm/entrypoints/serve/middleware/register.py: --api-key wins over VLLM_API_KEY.
            "api_tokens": [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key],
            "dev_mode": bool(envs.VLLM_SERVER_DEV_MODE),
            "loaded_logits_processors": loaded,
        })
    else:
        answer({"ok": False, "exit": None, "error": f"unknown op {op!r} for {kind}"})
"""


class RealParser:
    """sglang's or vllm's own parser in a child Python, asked one JSON line at a time."""

    def __init__(self, kind: str, log_path: Path) -> None:
        self.kind = kind
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  # closed in close()
        self._buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=log_path.parent,
            bufsize=0,
        )
        self.first = self._read(CHILD_START_TIMEOUT)
        self.version = str(self.first.get("version", ""))

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                self.close()
                pytest.fail(f"the {self.kind} parser child did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                code = self.proc.wait(timeout=10)
                pytest.fail(f"the {self.kind} parser child exited ({code}):\n{self.log_tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(CHILD_ANSWER_TIMEOUT)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def _real_parser(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealParser]:
    parser = RealParser(kind, tmp_path_factory.mktemp(f"{kind}-parser") / "child.log")
    try:
        if "skip" in parser.first:
            pytest.skip(str(parser.first["skip"]))
        yield parser
    finally:
        parser.close()


@pytest.fixture(scope="module")
def sglang_parser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealParser]:
    """sglang's ``prepare_server_args`` (``sglang/srt/server_args.py``), the parser ``sglang.launch_server`` runs."""
    yield from _real_parser("sglang", tmp_path_factory)


@pytest.fixture(scope="module")
def vllm_parser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealParser]:
    """The ``vllm serve`` parser (``vllm/entrypoints/cli/main.py`` + ``serve.py``, ``make_arg_parser``)."""
    yield from _real_parser("vllm", tmp_path_factory)


SGLANG_FIELDS = [
    "model_path",
    "host",
    "port",
    "api_key",
    "mem_fraction_static",
    "enable_memory_saver",
    "enable_weights_cpu_backup",
    "device",
    "base_gpu_id",
    "served_model_name",
]
VLLM_FIELDS = [
    "subparser",
    "model_tag",
    "host",
    "port",
    "api_key",
    "gpu_memory_utilization",
    "enable_sleep_mode",
    "served_model_name",
    "logits_processors",
]


def _sglang_parse(parser: RealParser, launch: Launch) -> dict[str, Any]:
    # python -m sglang.launch_server: prepare_server_args(sys.argv[1:])
    assert launch.argv[1:3] == ["-m", "sglang.launch_server"]
    answer = parser.ask(op="parse", argv=launch.argv[3:], fields=SGLANG_FIELDS)
    assert answer["ok"], f"sglang {parser.version} refused our command line ({answer['exit']}): {answer['error']}"
    fields: dict[str, Any] = answer["fields"]
    return fields


def _vllm_parse(parser: RealParser, launch: Launch) -> dict[str, Any]:
    # python -m vllm.entrypoints.cli.main serve ...: the vllm parser reads sys.argv[1:]
    assert launch.argv[1:3] == ["-m", "vllm.entrypoints.cli.main"]
    env = {k: v for k, v in launch.env.items() if k in ("VLLM_API_KEY", "VLLM_SERVER_DEV_MODE")}
    answer = parser.ask(op="parse", argv=launch.argv[3:], env=env, fields=VLLM_FIELDS)
    assert answer["ok"], f"vllm {parser.version} refused our command line ({answer['exit']}): {answer['error']}"
    return answer


def _assert_key_off_argv(engine: ResidentEngine, launch: Launch) -> None:
    key = engine.vlm_config()["api_key"]
    assert "--api-key" not in launch.argv
    assert not any(key in item for item in launch.argv), "the API key is on the process list"


# --- SGLang, real parser -------------------------------------------------------------------------


def test_sglang_reads_our_gpu_command_line(
    sglang_parser: RealParser, launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    engine, launch = launched("sglang", model_path=model_dir, device="cuda:1", mem_fraction=0.5, model_name="mineru")
    got = _sglang_parse(sglang_parser, launch)
    assert got["model_path"] == str(model_dir)
    assert got["host"] == "127.0.0.1"
    assert got["port"] == _port(engine)
    assert got["mem_fraction_static"] == pytest.approx(0.5)
    assert got["enable_memory_saver"] is True
    assert (got["device"], got["base_gpu_id"]) == ("cuda", 1)
    assert got["served_model_name"] == "mineru"
    assert got["api_key"] == engine.vlm_config()["api_key"], "SGLang did not read our key from --config"
    _assert_key_off_argv(engine, launch)


def test_sglang_reads_our_cpu_command_line(
    sglang_parser: RealParser, launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    engine, launch = launched("sglang", model_path=model_dir, device="cpu")
    got = _sglang_parse(sglang_parser, launch)
    assert (got["device"], got["base_gpu_id"]) == ("cpu", 0)  # 0 is SGLang's default, not ours
    assert got["mem_fraction_static"] is None
    assert got["api_key"] == engine.vlm_config()["api_key"]


def test_sglang_keeps_the_weights_on_the_host_while_asleep(
    sglang_parser: RealParser, launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    # The CPU copy is made by torch_memory_saver's region(enable_cpu_backup=...) around the
    # weight load (model_runner_components/load_model_utils.py), and that adapter exists only
    # with --enable-memory-saver (TorchMemorySaverAdapter.create(enable=enable_memory_saver)):
    # both flags are needed.
    _, launch = launched("sglang", model_path=model_dir, device="cuda:0", mem_fraction=0.5)
    got = _sglang_parse(sglang_parser, launch)
    assert got["enable_memory_saver"] is True
    assert got["enable_weights_cpu_backup"] is True


def test_sglang_starts_with_a_key_that_begins_with_a_dash(
    sglang_parser: RealParser,
    launched: Callable[..., tuple[ResidentEngine, Launch]],
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _dash_first(monkeypatch)
    engine, launch = launched("sglang", model_path=model_dir, device="cpu")
    got = _sglang_parse(sglang_parser, launch)
    assert got["api_key"] == engine.vlm_config()["api_key"]


def test_the_key_in_sglangs_server_args_log_line_is_redacted(
    sglang_parser: RealParser, launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    """SGLang logs ``server_args`` with the key in clear; our log tails go into exceptions and status()."""
    engine, launch = launched("sglang", model_path=model_dir, device="cpu")
    key = engine.vlm_config()["api_key"]
    answer = sglang_parser.ask(op="log_line", argv=launch.argv[3:])
    assert answer["ok"], answer
    line = answer["line"]
    assert f"'api_key': '{key}'" in line  # what SGLang writes to our server.log
    for known in ([key], []):  # our own key, and a key we were not told (an attached server's log)
        redacted = redact(line, known)
        assert key not in redacted
        assert f"'api_key': '{REDACTED}'" in redacted
        assert "'admin_api_key': None" in redacted
        assert f"'model_path': '{model_dir}'" in redacted, "only the key is hidden"


def test_our_copy_of_sglangs_config_rule_matches_sglang(sglang_parser: RealParser) -> None:
    configs: list[dict[str, Any]] = [
        {"api-key": "-starts-with-a-dash"},
        {"api-key": "plain_Key-123", "port": 31000},
        {"enable-memory-saver": True, "enable-weights-cpu-backup": False, "mem-fraction-static": 0.25},
        {"json-model-override-args": {"a": 1}},
    ]
    for config in configs:
        answer = sglang_parser.ask(op="convert", config=config)
        store_true = frozenset(answer["store_true"])
        assert sglang_config_to_argv(config, store_true) == answer["argv"], config


def test_sglang_ignores_minerus_repetition_guard(sglang_parser: RealParser) -> None:
    """SGLang's ChatCompletionRequest drops ``vllm_xargs``: MinerU's no-repeat guard never reaches it.

    This is why the engine must say so at start; if this test fails, SGLang learned the field.
    """
    body = _minerus_request_body()
    assert body["vllm_xargs"]["no_repeat_ngram_size"] == 100
    answer = sglang_parser.ask(op="request", body=body)
    assert "vllm_xargs" not in answer["dump"]
    assert not any("no_repeat_ngram" in str(key) for key in answer["dump"])


# --- vLLM, real parser ----------------------------------------------------------------------------


def test_vllm_reads_our_command_line(
    vllm_parser: RealParser, launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    engine, launch = launched("vllm", model_path=model_dir, mem_fraction=0.5, model_name="mineru")
    answer = _vllm_parse(vllm_parser, launch)
    got = answer["fields"]
    assert got["subparser"] == "serve"
    assert got["model_tag"] == str(model_dir)
    assert answer["engine"]["model"] == str(model_dir)
    assert got["host"] == "127.0.0.1"
    assert got["port"] == _port(engine)
    assert got["gpu_memory_utilization"] == pytest.approx(0.5)
    assert answer["engine"]["gpu_memory_utilization"] == pytest.approx(0.5)
    assert got["enable_sleep_mode"] is True
    assert answer["engine"]["enable_sleep_mode"] is True
    assert got["served_model_name"] == ["mineru"]
    assert got["api_key"] is None  # nothing on argv ...
    assert answer["api_tokens"] == [engine.vlm_config()["api_key"]]  # ... the key comes from VLLM_API_KEY
    assert answer["dev_mode"] is True  # /sleep, /wake_up and /is_sleeping are mounted
    _assert_key_off_argv(engine, launch)


def test_vllm_loads_minerus_logits_processor(
    vllm_parser: RealParser, launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    _, launch = launched("vllm", model_path=model_dir, mem_fraction=0.5)
    answer = _vllm_parse(vllm_parser, launch)
    assert answer["engine"]["logits_processors"] == [MINERU_LOGITS_PROCESSOR]
    # vLLM loads it by FQCN at start; it must be a vllm.v1 LogitsProcessor of this vLLM.
    assert answer["loaded_logits_processors"] == [
        "mineru_vl_utils.logits_processor.vllm_v1_no_repeat_ngram:VllmV1NoRepeatNGramLogitsProcessor"
    ]


def test_vllms_dev_mode_routes_need_no_key(vllm_parser: RealParser) -> None:
    """What docs/engine.md says of ``VLLM_SERVER_DEV_MODE``: the sleep routes, RPC and weight updates are open."""
    answer = vllm_parser.ask(op="routes")
    assert answer["sleep_file"].endswith("vllm/entrypoints/serve/dev/sleep/api_router.py")
    dev = set(answer["dev"])
    assert {"/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/update_weights"} <= dev
    guarded = tuple(answer["guarded"])
    assert guarded == ("/v1", "/v2", "/inference", "/cohere")
    assert not [path for path in dev if path.startswith(guarded)], "vLLM's key guards none of the dev routes"


def test_minerus_repetition_guard_reaches_vllms_sampling_params(vllm_parser: RealParser) -> None:
    """MinerU sends ``vllm_xargs``; vLLM hands it to logits processors as ``SamplingParams.extra_args``."""
    answer = vllm_parser.ask(op="request", body=_minerus_request_body(), max_tokens=64)
    assert answer["extra_args"]["no_repeat_ngram_size"] == 100


def test_admission_assumes_vllms_own_default_utilisation(
    vllm_parser: RealParser, launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    _, launch = launched("vllm", model_path=model_dir, probe=card(total_gib=80))
    default = _vllm_parse(vllm_parser, launch)["engine"]["gpu_memory_utilization"]
    assert launch.ledger_need_mib == [pytest.approx(default * 80 * 1024)]


# --- pure: the key rule, flags and figures, without sglang or vllm ------------------------------


def test_ten_thousand_engine_keys_survive_sglangs_config_rule(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    failures: list[tuple[str, str]] = []
    keys: set[str] = set()
    for _ in range(10_000):
        key = ResidentEngine("sglang", model_path=model, device="cpu").vlm_config()["api_key"]
        keys.add(key)
        if len(key) < 32:  # 24 random bytes at least
            failures.append((key, f"only {len(key)} characters"))
        # The engine writes the key file as JSON (valid YAML); SGLang yaml.safe_loads it.
        config = yaml.safe_load(json.dumps({"api-key": key}))
        argv = [*sglang_config_to_argv(config), "--port", "30000"]
        try:
            parsed = _parsed_key(argv)
        except ValueError as exc:
            failures.append((key, str(exc)))
            continue
        if parsed != key:
            failures.append((key, f"read back as {parsed!r}"))
    assert not failures, f"{len(failures)} of 10000 keys do not survive SGLang's --config, e.g. {failures[:3]}"
    assert len(keys) == 10_000, "two engines got the same key"


def test_a_key_that_begins_with_a_dash_survives_sglangs_config_rule(
    launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dash_first(monkeypatch)
    engine, launch = launched("sglang", model_path=model_dir, device="cpu")
    assert _parsed_key(sglang_merge_config(launch.argv[3:])) == engine.vlm_config()["api_key"]


def test_our_key_file_is_what_sglangs_config_rule_reads(
    launched: Callable[..., tuple[ResidentEngine, Launch]], model_dir: Path
) -> None:
    engine, launch = launched("sglang", model_path=model_dir, device="cpu")
    key = engine.vlm_config()["api_key"]
    assert launch.config_path is not None
    assert launch.config_path.suffix == ".yaml"  # SGLang refuses other suffixes
    assert launch.config_mode == 0o600
    assert yaml.safe_load(launch.config_text or "") == {"api-key": key}
    merged = sglang_merge_config(launch.argv[3:])
    assert "--config" not in merged
    assert _parsed_key(merged) == key


def _minerus_request_body() -> dict[str, Any]:
    """The chat request MinerU's http-client builds for one block, with MinerU's default sampling."""
    from mineru_vl_utils.vlm_client.base_client import SamplingParams
    from mineru_vl_utils.vlm_client.http_client import HttpVlmClient

    client = HttpVlmClient(model_name="mineru", server_url="http://127.0.0.1:9", skip_model_name_checking=True)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16  # the image bytes are only base64-encoded, never decoded here
    body: dict[str, Any] = client.build_request_body(
        "", [png], "\nText Recognition:", SamplingParams(no_repeat_ngram_size=100, max_new_tokens=64), "png", None
    )
    return body

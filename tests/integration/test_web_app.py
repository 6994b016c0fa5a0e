"""The web-app guide's three shapes on a real uvicorn server, driven by real HTTP clients.

Each test starts one of ``examples/web_app*.py`` (the files docs/guides/web-app.md shows) under
uvicorn in a subprocess on 127.0.0.1 (``web_host.WebServer``: a free port, ``/health`` polled with
a bound, every request's start and end recorded by a wrapper that changes nothing) and sends it
multipart uploads with httpx. Volume runs on MinerU's ``flash`` tier (no models) over corpus and
generated PDFs (generated ones only, where the corpus is absent); the shapes that need models run
``pipeline`` on random weights, or the SGLang stand-in for the resident engine (SGLang cannot run
here), and the heavier variants are ``slow``.

What a client may see: 200 with the Markdown, a 4xx whose body names the error type and the
document, or 503 (the service cannot parse now: retry). Never another 5xx, and never a request
that reached the app without an answer.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import CORPUS_DIR
from mineru_vram.testing import make_pdf
from support import HAS_GPU, all_gone, wait_for
from web_host import WebServer

for _module in ("fastapi", "uvicorn", "multipart", "httpx"):
    pytest.importorskip(_module, reason="pip install --group test (fastapi, uvicorn, python-multipart, httpx)")

DATA = Path(__file__).resolve().parents[1] / "data" / "pdfjs"
DOUBTFUL = "bug1606566.pdf"  # accepted with a doubt (no PDF header); MinerU then fails on it
# uvicorn stops gracefully on SIGTERM and then re-raises the signal, so a clean stop exits by SIGTERM.
CLEAN_EXITS = (0, 128 + signal.SIGTERM)
REQUEST_TIMEOUT = 300.0  # seconds one request may take: it may wait behind every other parse
LOAD_TIMEOUT = 900.0  # seconds a whole load run may take
LONG_PAGES = 300  # a generated PDF whose flash parse lasts seconds: long enough to kill its worker mid-parse


@dataclass(frozen=True)
class Upload:
    """One kind of request and the answer it must get."""

    name: str
    data: bytes
    status: int
    error: str | None = None  # the error type the body names (None for 200)
    pages: str | None = None  # the ?pages= query
    page_count: int | None = None  # pages in a 200's result


@dataclass
class Outcome:
    id: str
    upload: Upload
    sent: float
    done: float = 0.0
    status: int | None = None
    body: Any = None
    exception: str | None = None


@pytest.fixture
def start_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., WebServer]]:
    """Starts an example app (``flash``, 1 MiB uploads unless told otherwise); kills what still runs at teardown.

    ``models=True`` points the server at the random-weight model tree (built on first use).
    """
    started: list[WebServer] = []

    def start(example: str, *, standin: bool = False, models: bool = False, **env: str) -> WebServer:
        folder = tmp_path / f"{example}-{len(started)}"
        folder.mkdir()
        server_env = {"PARSER_BACKEND": "flash", "PARSER_MAX_MB": "1"}
        if not HAS_GPU:
            server_env["MINERU_VRAM_DEVICE"] = "cpu"
        if models:
            server_env["MINERU_VRAM_MODELS_DIR"] = str(request.getfixturevalue("random_models_dir"))
        server = WebServer(example, folder, env={**server_env, **env}, standin=standin)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


def _valid_pdfs() -> dict[str, tuple[str, bytes]]:
    """The valid PDFs by role: the corpus's (../shared/corpus) where it is present, else generated ones."""
    if (CORPUS_DIR / "test.pdf").is_file():
        return {
            role: (name, (CORPUS_DIR / name).read_bytes())
            for role, name in (
                ("one", "test.pdf"),
                ("paper", "demo1.pdf"),
                ("other", "demo3.pdf"),
                ("big", "demo2.pdf"),
            )
        }
    return {
        "one": ("one.pdf", make_pdf(1)),
        "paper": ("paper.pdf", make_pdf(13)),
        "other": ("other.pdf", make_pdf(10)),
        "big": ("big.pdf", make_pdf(1000)),
    }


@pytest.fixture(scope="module")
def uploads() -> dict[str, Upload]:
    """Every kind of request the load mixes, by a short key."""
    from conftest import _encrypt_pdf

    pdfs = _valid_pdfs()
    one_name, one = pdfs["one"]
    big_name, big = pdfs["big"]
    assert len(big) > 1024 * 1024, "a real PDF over the 1 MiB limit"
    return {
        "one": Upload(one_name, one, 200, page_count=1),
        "paper-p1": Upload(pdfs["paper"][0], pdfs["paper"][1], 200, pages="1", page_count=1),
        "other-p2": Upload(pdfs["other"][0], pdfs["other"][1], 200, pages="2", page_count=1),
        "generated": Upload("generated.pdf", make_pdf(2), 200, page_count=2),
        "notes": Upload("notes.txt", b"Meeting notes, not a PDF\n", 422, "NotAPdfError"),
        "empty": Upload("empty.pdf", b"", 422, "EmptyDocumentError"),
        "truncated": Upload("truncated.pdf", one[: len(one) // 2], 422, "TruncatedDocumentError"),
        "encrypted": Upload("encrypted.pdf", _encrypt_pdf(make_pdf(1)), 422, "EncryptedDocumentError"),
        "no-page-7": Upload("no-page-7.pdf", one, 422, "ConfigurationError", pages="7"),
        "big": Upload(big_name, big, 413, "DocumentTooLargeError"),
        "doubtful": Upload(DOUBTFUL, (DATA / DOUBTFUL).read_bytes(), 422, "ParseError"),  # MinerU fails on it
        "oversized": Upload("oversized.bin", random.Random(0).randbytes(3 * 1024 * 1024), 413, "DocumentTooLargeError"),
    }


async def _send(client: Any, url: str, upload: Upload, rid: str) -> Outcome:
    import httpx

    outcome = Outcome(rid, upload, time.time())
    params = {"pages": upload.pages} if upload.pages else None
    try:
        answer = await client.post(
            f"{url}/parse",
            files={"file": (upload.name, upload.data, "application/pdf")},
            params=params,
            headers={"x-request-id": rid},
            timeout=REQUEST_TIMEOUT,
        )
    except httpx.TransportError as exc:
        outcome.exception = type(exc).__name__
    else:
        outcome.status = answer.status_code
        outcome.body = answer.json()
    outcome.done = time.time()
    return outcome


async def _load(url: str, plan: list[Upload], clients: int) -> list[Outcome]:
    """``clients`` concurrent clients, each on its own connection, share ``plan`` until it is done."""
    import httpx

    todo = iter(enumerate(plan))
    outcomes: list[Outcome] = []

    async def client() -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http:
            for i, upload in todo:
                outcomes.append(await _send(http, url, upload, f"r{i}"))

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), LOAD_TIMEOUT)
    return outcomes


def _by_id(events: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The recorder's events of ``/parse`` requests: request id to its ``start`` and ``end`` events."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for event in events:
        if event["path"] == "/parse" and event["id"]:
            out.setdefault(event["id"], {})[event["event"]] = event
    return out


def _ended_events(server: WebServer, count: int, timeout: float = 10.0) -> dict[str, dict[str, dict[str, Any]]]:
    """The ``/parse`` events once ``count`` requests have their ``end`` (at most ``timeout`` s).

    The recorder writes a request's ``end`` when the app returns, which is after the client has
    the response: read at once, the last requests' ends may not be written yet.
    """
    events: dict[str, dict[str, dict[str, Any]]] = {}

    def ended() -> bool:
        events.update(_by_id(server.events()))
        return sum("end" in e for e in events.values()) >= count

    wait_for(ended, timeout=timeout, interval=0.05)
    return events


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _worker(server: WebServer) -> psutil.Process:
    """The isolated session's worker: the process under uvicorn that loaded MinerU (the largest by far)."""
    assert server.pid is not None
    procs = _descendants(server.pid)
    assert procs, "the isolated shape runs a worker process under the server"
    worker = max(procs, key=lambda p: p.memory_info().rss)
    assert worker.memory_info().rss > 100 * 1024 * 1024, "the worker has imported MinerU"
    return worker


def _stop_cleanly(server: WebServer, tree: list[int]) -> dict[str, Any]:
    """SIGTERM, then :func:`_stop_checks`; returns the receipt."""
    code = server.terminate()
    assert code in CLEAN_EXITS, f"exit code {code}:\n{server.log_tail()}"
    return _stop_checks(server, tree)


def _stop_checks(server: WebServer, tree: list[int]) -> dict[str, Any]:
    """After the server exited: the lifespan closed the session, printed a clean receipt once, and no
    process of ``tree`` (the server's, seen under load) is left."""
    log = server.log()
    receipt = server.receipt()
    assert receipt is not None, f"the lifespan did not finish:\n{server.log_tail()}"
    assert receipt["session_state"] == "closed"
    assert receipt["ok"], receipt["problems"]
    printed = [line for line in log.splitlines() if line.startswith("receipt: ")]
    assert printed == [f"receipt: {receipt['text']}"], "the lifespan printed the receipt once"
    assert printed[0].endswith("; ok")
    assert "Traceback" not in log, server.log_tail()
    assert all_gone(tree, timeout=15), f"left behind: {[p for p in tree if psutil.pid_exists(p)]}"
    return receipt


# --- 32 clients, a few hundred requests -------------------------------------------------------------


def test_32_clients_get_every_request_answered_and_none_lost(
    start_server: Callable[..., WebServer], uploads: dict[str, Upload]
) -> None:
    valid = [u for u in uploads.values() if u.status == 200]
    bad = [u for u in uploads.values() if u.status != 200]
    plan = valid * 32 + bad * 12  # 128 parses, 84 uploads refused before parsing, 12 that MinerU fails on
    random.Random(1).shuffle(plan)
    server = start_server("web_app")
    outcomes = asyncio.run(_load(server.url, plan, clients=32))

    assert len(outcomes) == len(plan)
    assert not [o for o in outcomes if o.status is None], "a request without an answer"
    assert not [o for o in outcomes if o.status >= 500], "a 5xx under load"  # type: ignore[operator]
    for o in outcomes:
        u = o.upload
        assert o.status == u.status, (u.name, o.status, o.body)
        if u.status == 200:
            assert o.body["document"] == u.name
            assert o.body["pages"] == u.page_count
            assert o.body["markdown"].strip()
        else:
            assert o.body["detail"]["error"] == u.error, (u.name, o.body)
            message = o.body["detail"]["message"]
            assert message.startswith(u.name) or "pages=" in message, message
    events = _ended_events(server, len(outcomes))
    assert set(events) == {o.id for o in outcomes}
    assert all(e["end"]["status"] == next(o.status for o in outcomes if o.id == i) for i, e in events.items())
    # The models were shared by every request: one session parsed them all, and it still serves.
    assert server.health() == {"session": "opened", "documents_parsed": len(valid) * 32}
    _stop_cleanly(server, server.tree())


# --- failures: MinerU fails, the worker dies ----------------------------------------------------------


def test_a_mineru_failure_and_a_killed_worker_are_typed_answers_and_the_service_keeps_serving(
    start_server: Callable[..., WebServer], uploads: dict[str, Upload]
) -> None:
    import httpx

    server = start_server("web_app_isolated")
    failed = asyncio.run(_load(server.url, [uploads["doubtful"]], clients=1))[0]
    assert failed.status == 422, failed.body
    assert failed.body["detail"]["error"] == "ParseError"
    assert failed.body["detail"]["message"].startswith(f"{DOUBTFUL}: MinerU failed")
    assert asyncio.run(_load(server.url, [uploads["one"]], clients=1))[0].status == 200

    worker = _worker(server)
    idle_cpu = sum(worker.cpu_times()[:2])
    long = Upload("long.pdf", make_pdf(LONG_PAGES), 503, "WorkerCrashedError")  # a parse that lasts seconds
    with httpx.Client(timeout=REQUEST_TIMEOUT) as http, _in_thread() as run:
        answer = run(
            lambda: http.post(f"{server.url}/parse", files={"file": (long.name, long.data, "application/pdf")})
        )
        # Kill it mid-parse: once the worker has spent half a second of CPU on this document.
        assert wait_for(lambda: sum(worker.cpu_times()[:2]) > idle_cpu + 0.5, timeout=120, interval=0.05)
        worker.send_signal(signal.SIGKILL)
        killed = answer()
    assert killed.status_code == 503, killed.text
    assert killed.headers["retry-after"] == "10"
    detail = killed.json()["detail"]
    assert detail["error"] == "WorkerCrashedError"
    assert detail["message"].startswith(f"{long.name}: "), "the error names the document"
    assert "SIGKILL" in detail["message"]
    assert all_gone([worker.pid])

    # The next requests start a fresh worker and are answered as before.
    after = asyncio.run(_load(server.url, [uploads["one"], uploads["notes"], uploads["generated"]], 2))
    assert sorted(o.status for o in after) == [200, 200, 422]  # type: ignore[type-var]
    assert _worker(server).pid != worker.pid
    assert server.health()["documents_parsed"] == 3
    receipt = _stop_cleanly(server, server.tree())
    assert receipt["receipt"]["isolation"] == "process"


class _in_thread:
    """Run a blocking call in a thread; ``run(fn)`` returns a function that waits for its result."""

    def __enter__(self) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
        import concurrent.futures

        self.pool = concurrent.futures.ThreadPoolExecutor(1)

        def run(fn: Callable[[], Any]) -> Callable[[], Any]:
            future = self.pool.submit(fn)
            return lambda: future.result(timeout=REQUEST_TIMEOUT)

        return run

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)


# --- SIGTERM under load ---------------------------------------------------------------------------------


async def _until_stopped(server: WebServer, uploads: list[Upload], clients: int, answered_before: int) -> Any:
    """Clients send in a loop; once ``answered_before`` answers came and requests are in flight, SIGTERM.

    Returns the outcomes, the SIGTERM's time, the exit code and the process tree seen under load.
    """
    import httpx

    outcomes: list[Outcome] = []
    counter = itertools.count()
    stopping = asyncio.Event()
    cycle = itertools.cycle(uploads)

    async def client() -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http:
            while True:
                outcome = await _send(http, server.url, next(cycle), f"r{next(counter)}")
                outcomes.append(outcome)
                if outcome.exception is not None and stopping.is_set():
                    return  # the server is gone: this client stops

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    try:

        async def ready() -> None:
            while sum(o.status is not None for o in outcomes) < answered_before:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(ready(), LOAD_TIMEOUT)
        tree = server.tree()
        in_flight = [i for i, e in _by_id(server.events()).items() if "end" not in e]
        assert len(in_flight) >= clients // 2, "SIGTERM must come under load"
        stopping.set()
        sigterm = time.time()
        code = await asyncio.to_thread(server.terminate)
        await asyncio.wait_for(asyncio.gather(*tasks), LOAD_TIMEOUT)
    finally:
        for task in tasks:
            task.cancel()
    return outcomes, sigterm, code, tree


def _check_sigterm_run(server: WebServer, outcomes: list[Outcome], sigterm: float, code: int, tree: list[int]) -> None:
    events = _by_id(server.events())
    by_id = {o.id: o for o in outcomes}
    # Every request that reached the app was answered, with what the client received.
    for rid, seen in events.items():
        assert "end" in seen, f"{rid} reached the app and got no answer"
        status = seen["end"]["status"]
        assert status is not None
        assert status < 500 or status == 503, (rid, status)
        assert by_id[rid].status == status, (rid, by_id[rid])
    # Requests in flight at SIGTERM finished (200, or 4xx for the bad uploads) or got 503.
    finished_late = [i for i, e in events.items() if e["start"]["t"] < sigterm < e["end"]["t"]]
    assert finished_late, "no request was in flight at SIGTERM"
    for rid in finished_late:
        assert by_id[rid].status in (by_id[rid].upload.status, 503), by_id[rid]
    # A request without an answer never reached the app: it came after the server stopped listening.
    unanswered = [o for o in outcomes if o.status is None]
    assert unanswered, "every client tried again after SIGTERM"
    for o in unanswered:
        assert o.id not in events, f"{o.id} reached the app and its answer was lost ({o.exception})"
        assert o.sent > sigterm - 1.0, o
    assert not [o for o in outcomes if o.status is not None and o.status >= 500 and o.status != 503]
    assert code in CLEAN_EXITS, server.log_tail()
    _stop_checks(server, tree)


@pytest.mark.parametrize("example", ["web_app_isolated", pytest.param("web_app", marks=pytest.mark.slow)])
def test_sigterm_under_load_finishes_what_is_in_flight_and_leaves_nothing(
    start_server: Callable[..., WebServer], uploads: dict[str, Upload], example: str
) -> None:
    server = start_server(example)
    mix = [uploads[n] for n in ("one", "notes", "other-p2", "generated", "encrypted")]
    outcomes, sigterm, code, tree = asyncio.run(_until_stopped(server, mix, clients=16, answered_before=24))
    if example == "web_app_isolated":
        assert len(tree) >= 3, "keeper, uvicorn and the worker"
    _check_sigterm_run(server, outcomes, sigterm, code, tree)


# --- idle release -----------------------------------------------------------------------------------------


@pytest.fixture
def standin_model(tmp_path: Path) -> Path:
    """What the SGLang stand-in is told to serve (it loads nothing from it)."""
    folder = tmp_path / "MinerU2.5-standin"
    folder.mkdir()
    return folder


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_an_idle_engine_sleeps_and_the_next_request_wakes_it(
    start_server: Callable[..., WebServer], standin_model: Path
) -> None:
    server = start_server(
        "web_app_engine",
        standin=True,
        models=True,
        PARSER_BACKEND="hybrid",
        VLM_MODEL_PATH=str(standin_model),
        VLM_KEEP_ALIVE="3s",
    )
    page = Upload("page.pdf", make_pdf(1, table=False), 200, page_count=1)
    first = asyncio.run(_load(server.url, [page], clients=1))[0]
    assert first.status == 200, first.body
    assert first.body["markdown"].strip()

    # keep_alive: after 3 s without a request the engine sleeps (its GPU memory released).
    assert wait_for(lambda: server.health()["engine"] == "sleeping", timeout=120, interval=0.2)
    asleep = server.health()
    assert asleep["engine_idle_seconds"] >= 3.0
    assert asleep["engine_last_change"].startswith("sleep: ")
    tree = server.tree()
    assert len(tree) >= 4, "keeper, uvicorn, and the engine's keeper and server: asleep, not stopped"

    # The next request wakes it and is answered as the first was.
    second = asyncio.run(_load(server.url, [page], clients=1))[0]
    assert second.status == 200, second.body
    assert second.body["markdown"] == first.body["markdown"]
    awake = server.health()
    assert awake["engine"] == "ready"
    assert awake["engine_last_change"].startswith("wake: ")
    assert awake["documents_parsed"] == 2

    receipt = _stop_cleanly(server, tree)
    assert receipt["engine_state"] == "stopped"
    assert "engine stop: " in server.log()


# --- the shapes on MinerU's models (random weights) -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("example", ["web_app", "web_app_isolated"])
def test_pipeline_shapes_parse_with_models_and_release_them(
    start_server: Callable[..., WebServer], uploads: dict[str, Upload], example: str
) -> None:
    server = start_server(example, models=True, PARSER_BACKEND="pipeline")
    plan = [uploads[n] for n in ("generated", "notes", "one", "encrypted", "oversized")]
    outcomes = asyncio.run(_load(server.url, plan * 2, clients=4))
    assert [o.status for o in outcomes if o.status != o.upload.status] == []
    receipt = _stop_cleanly(server, server.tree())
    assert receipt["receipt"]["models_released"] > 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_sigterm_under_load_on_the_engine_shape(
    start_server: Callable[..., WebServer], uploads: dict[str, Upload], standin_model: Path
) -> None:
    server = start_server(
        "web_app_engine", standin=True, models=True, PARSER_BACKEND="hybrid", VLM_MODEL_PATH=str(standin_model)
    )
    mix = [Upload("page.pdf", make_pdf(1, table=False), 200, page_count=1), uploads["notes"]]
    outcomes, sigterm, code, tree = asyncio.run(_until_stopped(server, mix, clients=4, answered_before=3))
    _check_sigterm_run(server, outcomes, sigterm, code, tree)
    assert "engine stop: " in server.log()

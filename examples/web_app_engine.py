"""The web service of web_app.py parsing through a resident VLM engine, released when idle.

    pip install 'mineru-vram[sglang]' fastapi uvicorn python-multipart
    VLM_MODEL_PATH=/models/MinerU2.5-Pro-2605-1.2B uvicorn web_app_engine:app --host 127.0.0.1 --port 8000

ResidentEngine.get() starts one SGLang server for the process, shared by every request. After
VLM_KEEP_ALIVE of idleness (default 10m) it sleeps: its GPU memory is released (the small models of
the "hybrid" backend stay in this process) and the next request wakes it. /health shows its state.

docs/guides/web-app.md shows this file as it is; tests/integration/test_web_app.py runs it.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, UploadFile

from mineru_vram import (
    ConfigurationError,
    DocumentTooLargeError,
    EngineError,
    InvalidDocumentError,
    ModelSession,
    OutOfMemoryError,
    ParseError,
    ResidentEngine,
    SessionStateError,
)

BACKEND = os.environ.get("PARSER_BACKEND", "hybrid")
MAX_BYTES = int(float(os.environ.get("PARSER_MAX_MB", "50")) * 1024 * 1024)
# What ResidentEngine.get() is given. A test-only hook: the tests add "launcher":
# mineru_vram.testing.StandinLauncher() here (tests/web_host.py), which runs the SGLang stand-in,
# a loopback server that answers as SGLang does, where SGLang cannot be installed.
ENGINE: dict[str, Any] = {
    "engine": "sglang",
    "model_path": os.environ.get("VLM_MODEL_PATH", "/models/MinerU2.5-Pro-2605-1.2B"),
    "keep_alive": os.environ.get("VLM_KEEP_ALIVE", "10m"),
}


@asynccontextmanager
async def lifespan(app: FastAPI):
    engine = await asyncio.to_thread(ResidentEngine.get, **ENGINE)  # starts the server, off the event loop
    try:
        async with ModelSession(backend=BACKEND, engine=engine, max_document_bytes=MAX_BYTES) as session:
            app.state.session, app.state.engine = session, engine
            yield
        print(f"receipt: {session.release_report}", flush=True)
    finally:
        print(f"engine {await asyncio.to_thread(engine.stop)}", flush=True)  # what NVML saw it return


app = FastAPI(lifespan=lifespan)


@app.post("/parse")
async def parse(request: Request, file: UploadFile, pages: str | None = None) -> dict[str, Any]:
    session: ModelSession = request.app.state.session
    try:
        result = await session.aparse(file.file, name=file.filename, pages=pages)  # wakes the engine if asleep
    except DocumentTooLargeError as exc:
        raise problem(413, exc) from exc
    except (InvalidDocumentError, ConfigurationError) as exc:  # not a PDF, empty, truncated, encrypted; bad pages
        raise problem(422, exc) from exc
    except ParseError as exc:  # MinerU failed on this document
        raise problem(422, exc) from exc
    except (EngineError, OutOfMemoryError, SessionStateError) as exc:  # the engine crashed (it restarts); stopping
        raise problem(503, exc) from exc
    return {"document": result.document, "pages": result.page_count, "markdown": result.markdown}


@app.get("/health")
async def health(request: Request) -> dict[str, Any]:
    session: ModelSession = request.app.state.session
    engine: ResidentEngine = request.app.state.engine
    status = engine.status()
    return {
        "session": session.state.value,
        "documents_parsed": session.documents_parsed,
        "engine": status.state.value,  # "ready", or "sleeping" after keep_alive: its memory released
        "engine_mib": status.memory_mib,  # by NVML (None without a GPU)
        "engine_idle_seconds": round(status.idle_seconds, 1),
        "engine_last_change": str(engine.last_report) if engine.last_report else None,
    }


def problem(status: int, exc: Exception) -> HTTPException:
    """An HTTP error that names the problem: the error's type and its message (which names the document)."""
    headers = {"Retry-After": "10"} if status == 503 else None
    return HTTPException(status, {"error": type(exc).__name__, "message": str(exc)}, headers=headers)

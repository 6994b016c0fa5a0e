"""The web service of web_app.py with the models in a supervised worker process.

    uvicorn web_app_isolated:app --host 127.0.0.1 --port 8000

The web process never creates a CUDA context. A worker that crashes (a CUDA error, the OOM
killer) fails only the request it was parsing, with 503 and WorkerCrashedError; the next request
starts a fresh worker. A parse that runs past PARSER_TIMEOUT seconds (default 120) kills its
worker and answers 504. A worker that grew by more than 2 GiB is replaced between requests.
Closing the session at shutdown returns everything, the CUDA context included.

docs/guides/web-app.md shows this file as it is; tests/integration/test_web_app.py runs it.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, UploadFile

from mineru_vram import (
    ConfigurationError,
    DocumentTooLargeError,
    InvalidDocumentError,
    ModelSession,
    OutOfMemoryError,
    ParseError,
    ParseTimeoutError,
    SessionStateError,
    WorkerError,
)

BACKEND = os.environ.get("PARSER_BACKEND", "pipeline")
MAX_BYTES = int(float(os.environ.get("PARSER_MAX_MB", "50")) * 1024 * 1024)
TIMEOUT = float(os.environ.get("PARSER_TIMEOUT", "120"))


@asynccontextmanager
async def lifespan(app: FastAPI):
    session = ModelSession(backend=BACKEND, isolation="process", recycle_above_mib=2048, max_document_bytes=MAX_BYTES)
    async with session:
        app.state.session = session  # the worker has loaded the models before the first request
        yield
    print(f"receipt: {session.release_report}", flush=True)


app = FastAPI(lifespan=lifespan)


@app.post("/parse")
async def parse(request: Request, file: UploadFile, pages: str | None = None) -> dict[str, Any]:
    session: ModelSession = request.app.state.session
    try:
        result = await session.aparse(file.file, name=file.filename, pages=pages, timeout=TIMEOUT)
    except DocumentTooLargeError as exc:
        raise problem(413, exc) from exc
    except (InvalidDocumentError, ConfigurationError) as exc:  # not a PDF, empty, truncated, encrypted; bad pages
        raise problem(422, exc) from exc
    except ParseTimeoutError as exc:  # the worker was killed; the next request starts a new one
        raise problem(504, exc) from exc
    except ParseError as exc:  # MinerU failed on this document
        raise problem(422, exc) from exc
    except (WorkerError, OutOfMemoryError, SessionStateError) as exc:  # the worker died; the GPU is full; stopping
        raise problem(503, exc) from exc
    return {"document": result.document, "pages": result.page_count, "markdown": result.markdown}


@app.get("/health")
async def health(request: Request) -> dict[str, Any]:
    session: ModelSession = request.app.state.session
    return {"session": session.state.value, "documents_parsed": session.documents_parsed}


def problem(status: int, exc: Exception) -> HTTPException:
    """An HTTP error that names the problem: the error's type and its message (which names the document)."""
    headers = {"Retry-After": "10"} if status in (503, 504) else None
    return HTTPException(status, {"error": type(exc).__name__, "message": str(exc)}, headers=headers)

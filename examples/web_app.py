"""A PDF-to-Markdown web service: one mineru-vram session for the life of the app.

    pip install mineru-vram fastapi uvicorn python-multipart
    uvicorn web_app:app --host 127.0.0.1 --port 8000
    curl -F file=@paper.pdf 'http://127.0.0.1:8000/parse?pages=1-3'

The models load once, before the first request, and every request shares them; closing the
session at shutdown releases them and prints the receipt. Settings come from the environment:
PARSER_BACKEND (default "pipeline"), PARSER_MAX_MB (largest upload, default 50), and
mineru-vram's own MINERU_VRAM_MODELS_DIR and MINERU_VRAM_DEVICE.

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
    SessionStateError,
)

BACKEND = os.environ.get("PARSER_BACKEND", "pipeline")
MAX_BYTES = int(float(os.environ.get("PARSER_MAX_MB", "50")) * 1024 * 1024)


@asynccontextmanager
async def lifespan(app: FastAPI):
    # gc_freeze: this process is the service's own, so the collector may skip the loaded models
    # (a full collection over them costs about 0.3 s a page; docs/configuration.md)
    async with ModelSession(backend=BACKEND, max_document_bytes=MAX_BYTES, gc_freeze=True) as session:
        app.state.session = session  # the models are loaded before the first request
        yield  # serving; on SIGTERM uvicorn stops accepting and lets running requests finish
    print(f"receipt: {session.release_report}", flush=True)


app = FastAPI(lifespan=lifespan)


@app.post("/parse")
async def parse(request: Request, file: UploadFile, pages: str | None = None) -> dict[str, Any]:
    session: ModelSession = request.app.state.session
    try:
        # The upload as a file: the session reads at most max_document_bytes + 1 bytes of it.
        result = await session.aparse(file.file, name=file.filename, pages=pages)
    except DocumentTooLargeError as exc:
        raise problem(413, exc) from exc
    except (InvalidDocumentError, ConfigurationError) as exc:  # not a PDF, empty, truncated, encrypted; bad pages
        raise problem(422, exc) from exc
    except ParseError as exc:  # MinerU failed on this document
        raise problem(422, exc) from exc
    except (OutOfMemoryError, SessionStateError) as exc:  # the GPU is full, or the service is stopping
        raise problem(503, exc) from exc
    return {"document": result.document, "pages": result.page_count, "markdown": result.markdown}


@app.get("/health")
async def health(request: Request) -> dict[str, Any]:
    session: ModelSession = request.app.state.session
    return {"session": session.state.value, "documents_parsed": session.documents_parsed}


def problem(status: int, exc: Exception) -> HTTPException:
    """An HTTP error that names the problem: the error's type and its message (which names the document)."""
    headers = {"Retry-After": "10"} if status == 503 else None
    return HTTPException(status, {"error": type(exc).__name__, "message": str(exc)}, headers=headers)

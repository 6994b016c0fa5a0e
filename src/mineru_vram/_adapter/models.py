"""MinerU's model trees: where they are, how large, whether the hub answers, the error when missing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import state


def mineru_version() -> str | None:
    """The installed MinerU version, read from package metadata (no import)."""
    from importlib import metadata

    try:
        return metadata.version("mineru")
    except metadata.PackageNotFoundError:
        return None


# MinerU 4.0's model repositories under model.base_dir (mineru/model/registry.py), and the
# marker its downloader writes into a complete one (mineru/model/download.py).
MINERU_REPOS = (
    "MinerU-4_models_torch",
    "MinerU-4_models_onnx",
    "MinerU2.5-Pro-2605-1.2B",
    "MinerU2.5-Pro-2605-1.2B-GGUF",
)
COMPLETE_MARKER = ".mineru_complete"


def mineru_paths() -> dict[str, Any]:
    """Where MinerU would look for its configuration and models, worked out without importing it.

    MinerU's import reads and writes its configuration, so this reads the same sources
    itself, with MinerU 4.0's precedence: ``MINERU_MODEL_BASE_DIR`` > the config file's
    ``model.base_dir`` (``MINERU_CONFIG`` or ``$MINERU_HOME/config.yaml``) >
    ``$MINERU_HOME/models`` (``~/.mineru``). MinerU's already-imported config wins when
    present (and no session has patched it).

    Returns:
        ``home``, ``config_file``, ``config_exists``, ``config_error``, ``models_dir``,
        ``models_dir_exists``, ``model_source`` and ``repos`` (name, path, complete, MiB).
    """
    from mineru_vram._config import getenv

    home = Path(getenv("MINERU_HOME") or Path.home() / ".mineru").expanduser()
    config_file = Path(getenv("MINERU_CONFIG") or home / "config.yaml").expanduser()
    base_dir: str | None = getenv("MINERU_MODEL_BASE_DIR") or None
    source = getenv("MINERU_MODEL_SOURCE") or None
    config_error = None
    if config_file.is_file():
        try:
            import yaml

            data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            model = (data.get("model") or {}) if isinstance(data, dict) else {}
            base_dir = base_dir or model.get("base_dir")
            source = source or model.get("source")
        except Exception as exc:  # unreadable YAML is worth reporting, not crashing over
            config_error = f"{type(exc).__name__}: {exc}"
    models = Path(base_dir).expanduser() if base_dir else home / "models"
    mconf = sys.modules.get("mineru.config")
    if mconf is not None and state.shared is None:
        models = Path(str(mconf.config.model.base_dir)).expanduser()  # type: ignore[attr-defined]
    repos = []
    for name in MINERU_REPOS:
        root = models / name
        if not root.is_dir():
            continue
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        repos.append({"name": name, "path": str(root), "complete": _has_marker(root), "mib": size / 2**20})
    return {
        "home": str(home),
        "config_file": str(config_file),
        "config_exists": config_file.is_file(),
        "config_error": config_error,
        "models_dir": str(models),
        "models_dir_exists": models.is_dir(),
        "model_source": source or "auto",
        "repos": repos,
    }


def _has_marker(root: Path) -> bool:
    if (root / COMPLETE_MARKER).is_file():
        return True
    return any(p.name == COMPLETE_MARKER for p in root.rglob(COMPLETE_MARKER))


def default_models_dir() -> Path:
    """MinerU's own ``model.base_dir`` for this user (see :func:`mineru_paths`)."""
    return Path(mineru_paths()["models_dir"])


# About how large MinerU 4.0's model repositories are to download (GB), for messages only:
# the basic-tier torch tree is measured from the true architectures (testing.write_random_models
# writes the same tensors), the VLM sizes from their parameter counts (1.2B at bf16, Q8_0 GGUF).
DOWNLOAD_GB = {
    "MinerU-4_models_torch": 0.9,
    "MinerU-4_models_onnx": 0.9,
    "MinerU2.5-Pro-2605-1.2B": 2.4,
    "MinerU2.5-Pro-2605-1.2B-GGUF": 1.3,
}
# The hosts MinerU downloads from, per source.
_HUB_HOSTS = {"huggingface": ("huggingface.co",), "modelscope": ("modelscope.cn",)}
HUB_CONNECT_TIMEOUT = 3.0


def model_tier(tier: str) -> str:
    """The tier MinerU's model registry knows (``basic`` or ``standard``) for a parse tier.

    ``flash`` needs the small models (OCR) for scanned pages; ``advanced`` the VLM, as ``standard``.
    """
    return {"flash": "basic", "advanced": "standard"}.get(tier, tier)


def download_gb(names: list[str]) -> float:
    return sum(DOWNLOAD_GB.get(name, 1.0) for name in names)


def hub_unreachable(source: str) -> str | None:
    """Why MinerU could not download from ``source`` now, or ``None`` when a hub answers.

    A TCP connection to the hub (or to the HTTPS proxy, where one is set) within
    :data:`HUB_CONNECT_TIMEOUT` seconds; hosts are tried in parallel.
    """
    import concurrent.futures
    import socket
    import urllib.parse
    import urllib.request

    hosts = _HUB_HOSTS.get(source, _HUB_HOSTS["huggingface"] + _HUB_HOSTS["modelscope"])
    proxy = urllib.request.getproxies().get("https")
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "//" in proxy else f"//{proxy}")
        targets = [(parsed.hostname or "", parsed.port or 443)]
    else:
        targets = [(host, 443) for host in hosts]

    def attempt(target: tuple[str, int]) -> str | None:
        try:
            socket.create_connection(target, timeout=HUB_CONNECT_TIMEOUT).close()
        except OSError as exc:
            return f"{target[0]}:{target[1]}: {exc}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
        errors = list(pool.map(attempt, targets))
    if any(e is None for e in errors):
        return None
    return "the model hub cannot be reached (" + "; ".join(e for e in errors if e) + ")"


def models_error(missing: list[str], models_dir: str, reason: str, *, tier: str, document: str | None = None) -> Any:
    from mineru_vram._exceptions import ModelsNotAvailableError

    size = download_gb(missing)
    where = f"{document}: " if document else ""
    random = "mineru_vram.testing.write_random_models(path) writes a tree with random weights"
    gguf = next((name for name in missing if name.endswith("-GGUF")), None)
    if gguf is not None:
        random += f", and mineru_vram.testing.write_random_vlm_gguf(path / {gguf!r}) MinerU's llama.cpp model"
    return ModelsNotAvailableError(
        f"{where}MinerU's models for the {tier} tier are not in {models_dir} (missing: {', '.join(missing)}; "
        f"about {size:.1f} GB to download) and cannot be downloaded now: {reason}. Ways out: pass "
        "models_dir= (or set MINERU_VRAM_MODELS_DIR) to a complete MinerU model tree; download them ahead "
        "where the network is reachable with `mineru-vram models download` (or MinerU's "
        f"`mineru-models-download`); for tests and demos without weights, {random}.",
        models_dir=models_dir,
        missing=list(missing),
        download_gb=size,
        reason=reason,
        document=document,
    )


def is_models_not_ready(exc: BaseException) -> bool:
    """MinerU's own "model repo ... is not ready under ..." error, anywhere in the cause chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, FileNotFoundError) and "is not ready under" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False

"""Which model repositories a tier needs, and downloading them with MinerU's own downloader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import DOWNLOAD_GB, default_models_dir, hub_unreachable, model_tier, models_error
from .runtime import MineruRuntime


def tier_model_status(tier: str, *, models_dir: Path | None, small_backend: str = "torch") -> list[dict[str, Any]]:
    """The model repositories ``tier`` needs, and whether each is complete under ``models_dir``.

    Returns:
        One dict per repository: ``name``, ``path``, ``ready``, ``missing`` (paths), ``download_gb``.
    """
    runtime = MineruRuntime(device="cpu", models_dir=models_dir, small_backend=small_backend)
    runtime.activate()
    try:
        from mineru.model.download import verify_model_repo
        from mineru.model.registry import model_repos_for_tier

        out = []
        for repo in model_repos_for_tier(model_tier(tier), small_backend=small_backend):
            result = verify_model_repo(repo)
            out.append(
                {
                    "name": repo.name,
                    "path": str(result.root),
                    "ready": bool(result.ready),
                    "missing": list(result.missing_paths),
                    "download_gb": DOWNLOAD_GB.get(repo.name),
                }
            )
        return out
    finally:
        runtime.deactivate()


def download_models(
    tier: str, *, models_dir: Path | None, small_backend: str = "torch", source: str = "auto"
) -> list[str]:
    """Download what ``tier`` needs into ``models_dir`` with MinerU's own downloader.

    Args:
        source: ``auto`` (MinerU probes Hugging Face, else ModelScope), ``huggingface`` or
            ``modelscope``.

    Returns:
        The repositories now complete.

    Raises:
        ModelsNotAvailableError: the model hub cannot be reached (checked first, in seconds).
    """
    reason = hub_unreachable(source)
    if reason is not None:
        raise models_error(
            [r["name"] for r in tier_model_status(tier, models_dir=models_dir, small_backend=small_backend)],
            str(models_dir or default_models_dir()),
            reason,
            tier=tier,
        )
    runtime = MineruRuntime(device="cpu", models_dir=models_dir, small_backend=small_backend)
    runtime.activate()
    try:
        from mineru.model.download import download_model_repo
        from mineru.model.registry import model_repos_for_tier

        done = []
        for repo in model_repos_for_tier(model_tier(tier), small_backend=small_backend):
            download_model_repo(repo, source=source, reuse_ready=True)
            done.append(repo.name)
        return done
    finally:
        runtime.deactivate()

"""``mineru-vram models`` and ``mineru-vram demo``: MinerU's models on disk, and the offline demo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, err, mineru_quiet


def cmd_models(args: argparse.Namespace) -> int:
    from mineru_vram._adapter import download_models, tier_model_status
    from mineru_vram._config import resolve_backend

    tier = resolve_backend(args.backend, engine=True).tier
    models_dir = Path(args.models_dir).expanduser() if args.models_dir else None
    with mineru_quiet(args.verbose):
        if args.action == "download":
            try:
                download_models(tier, models_dir=models_dir, small_backend=args.small_backend, source=args.source)
            except Exception as exc:  # MinerU's downloader: network, disk, a repo not on that source
                err(f"mineru-vram models: download failed: {type(exc).__name__}: {exc}")
                return EXIT_FAILED
        status = tier_model_status(tier, models_dir=models_dir, small_backend=args.small_backend)
    if args.json:
        print(json.dumps({"backend": args.backend, "tier": tier, "repos": status}, indent=2))
    else:
        print(f"MinerU models for --backend {args.backend} (tier {tier}):")
        for repo in status:
            size = f", about {repo['download_gb']:.1f} GB to download" if repo["download_gb"] else ""
            state = "complete" if repo["ready"] else f"missing {', '.join(repo['missing'])}{size}"
            print(f"  {repo['name']:<32} {state}\n    {repo['path']}")
        if not all(r["ready"] for r in status):
            print("download them with: mineru-vram models download" + (f" --backend {args.backend}"))
    return EXIT_OK if all(r["ready"] for r in status) else EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from mineru_vram._demo import run_demo

    with mineru_quiet(args.verbose):
        return run_demo(device=args.device, models_dir=args.models_dir, out=args.out, isolation=args.isolation)

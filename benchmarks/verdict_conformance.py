"""Input verdicts against a peer's PDF test corpus: pdf.js's ``test/pdfs``.

pdf.js says which of its test files load: every local entry of ``test/test_manifest.json``
is loaded and rendered by its reference tests (entries with ``"link": true`` name files
fetched from elsewhere and are skipped; entries with a ``"password"`` need one), and
``test/unit/api_spec.js`` expects a few files to fail (``PEER_EXPECTATIONS`` below, read
off that file). This script judges every local PDF with ``load_document`` and measures:

1. **false rejections**: files the peer opens (or opens and then fails on a page) that
   we reject, of any class (target 0); and password files rejected as anything but
   encrypted;
2. **order independence**: every file judged twice in one process, in two random orders,
   and (``--fresh``) in a process of its own; any difference is listed;
3. **MinerU on what we let through** (``--mineru``): every file we accept with a doubt,
   and every file the peer rejects that we accept, parsed by MinerU's flash tier on the
   CPU (``ocr_mode="txt"``: no OCR models). Each must end as a parse or a typed
   ``ParseError`` naming the document;
4. **cut files** (``--cuts N``): N files the peer opens, each cut at 10, 50, 90 and 99 %,
   and what we say about them (truncated, accepted with a doubt, or accepted because
   pdfium still finds pages);
5. counts per verdict class, and per peer expectation.

Corpus: a pdf.js checkout (``--pdfjs DIR``: ``DIR/test/pdfs``, ``DIR/test/test_manifest.json``,
``DIR/test/unit/api_spec.js``) or the small subset kept in the repository (``--subset
tests/data/pdfjs``), whose ``expectations.json`` this script writes (``--write-subset``).

Usage:

    python benchmarks/verdict_conformance.py --pdfjs /tmp/pdf.js --commit <sha> --fresh all --mineru \\
        --cuts 300 --out verdicts.json
    python benchmarks/verdict_conformance.py --subset tests/data/pdfjs --fresh all --mineru
    python benchmarks/verdict_conformance.py --pdfjs /tmp/pdf.js --commit <sha> --write-subset tests/data/pdfjs
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# What api_spec.js expects of files that do not simply load (pdf.js commit 0f26334f9d6f, 2026-08-21).
# peer: "rejects" (getDocument fails), "password" (PasswordException without one), "page-fails"
# (the document loads, getPage(1) fails), "opens" (loads, stated here because the manifest lacks it).
PEER_EXPECTATIONS: dict[str, tuple[str, str]] = {
    "bug1020226.pdf": ("rejects", "InvalidPDFException 'Invalid PDF structure.' (severely corrupt)"),
    "REDHAT-1531897-0.pdf": ("rejects", "InvalidPDFException (bad XRef byteWidths)"),
    "poppler-395-0-fuzzed.pdf": ("rejects", "InvalidPDFException (inaccessible /Pages tree)"),
    "pr6531_1.pdf": ("password", "PasswordException (user and owner password)"),
    "pr6531_2.pdf": ("password", "PasswordException (only a user password)"),
    "issue3371.pdf": ("password", "PasswordException NEED_PASSWORD"),
    "poppler-742-0-fuzzed.pdf": ("page-fails", "numPages 1; getPage(1): 'Illegal character: 41'"),
    "poppler-937-0-fuzzed.pdf": ("page-fails", "numPages 1; getPage(1): 'End of file inside array.'"),
    "poppler-67295-0.pdf": ("opens", "bad /Pages tree /Count; numPages 1, page renders"),
    "poppler-85140-0.pdf": ("opens", "bad /Pages tree /Count; numPages 1, empty page"),
    "bug1606566.pdf": ("opens", "missing PDF header; metadata read"),
    "bug1980958.pdf": ("opens", "xref with an object number of 2147483647; numPages 1"),
}
OPENING = ("opens", "page-fails")  # the peer loads the document
REJECTING = ("not-a-pdf", "empty", "truncated", "encrypted", "too-large", "invalid")

# Judges files in a process that has judged no other PDF, one per process: pdfium's state is fresh.
_FRESH_CHILD = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from verdict_conformance import judge
print(json.dumps(judge(sys.argv[3])))
"""


def verdict_class(exc: BaseException | None, doubt: str | None) -> str:
    """The class of a verdict: an error type, or accepted (with or without a doubt)."""
    import mineru_vram as mv

    if exc is None:
        return "accepted" if doubt is None else "doubtful"
    for cls, name in (
        (mv.NotAPdfError, "not-a-pdf"),
        (mv.EmptyDocumentError, "empty"),
        (mv.TruncatedDocumentError, "truncated"),
        (mv.EncryptedDocumentError, "encrypted"),
        (mv.DocumentTooLargeError, "too-large"),
        (mv.InvalidDocumentError, "invalid"),
    ):
        if isinstance(exc, cls):
            return name
    return f"untyped:{type(exc).__name__}"


def judge(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """Judge one file (or ``data``) as ``parse`` would, with the session's default limits."""
    from mineru_vram._documents import load_document

    name = Path(path).name
    t0 = time.perf_counter()
    exc: BaseException | None = None
    doubt = pages = None
    try:
        doc = load_document(path if data is None else data, name=name, max_bytes=512 * 1024 * 1024)
        doubt, pages = getattr(doc, "doubt", None), doc.page_count  # getattr: also judges older versions
    except Exception as error:  # an untyped error is a finding, reported as such
        exc = error
    return {
        "verdict": verdict_class(exc, doubt),
        "message": str(exc) if exc is not None else doubt,
        "pages": pages,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def load_pdfjs(root: Path) -> tuple[list[Path], dict[str, tuple[str, str]]]:
    """The local PDFs of a pdf.js checkout and what the peer expects of each."""
    pdfs = sorted(p for p in (root / "test" / "pdfs").glob("*.pdf") if p.is_file())
    peer: dict[str, tuple[str, str]] = {}
    manifest = json.loads((root / "test" / "test_manifest.json").read_text(encoding="utf-8"))
    for entry in manifest:
        if entry.get("link"):
            continue  # fetched from elsewhere by pdf.js's test runner: not in the checkout
        name = Path(entry["file"]).name
        if entry.get("password") is not None:
            peer[name] = ("password", f"manifest {entry['id']}: loads with its password")
        else:
            peer.setdefault(name, ("opens", f"manifest {entry['id']} ({entry['type']})"))
    api_spec = root / "test" / "unit" / "api_spec.js"
    text = api_spec.read_text(encoding="utf-8") if api_spec.exists() else ""
    for name in set(re.findall(r'buildGetDocumentParams\(\s*"([^"]+\.pdf)"', text)):
        peer.setdefault(name, ("opens", "api_spec.js loads it"))
    for name, expectation in PEER_EXPECTATIONS.items():
        if name not in text:
            print(f"warning: {name} is no longer named in api_spec.js; its expectation may be stale", file=sys.stderr)
        peer[name] = expectation
    return pdfs, peer


def load_subset(root: Path) -> tuple[list[Path], dict[str, tuple[str, str]], dict[str, Any]]:
    spec = json.loads((root / "expectations.json").read_text(encoding="utf-8"))
    files = {name: (info["peer"], info["peer_note"]) for name, info in spec["files"].items()}
    return sorted(root / name for name in files), files, spec


def judge_in_order(pdfs: list[Path], seed: int) -> dict[str, dict[str, Any]]:
    order = list(pdfs)
    random.Random(seed).shuffle(order)
    return {p.name: judge(p) for p in order}


def judge_fresh(pdfs: list[Path], jobs: int) -> dict[str, dict[str, Any]]:
    """Each file judged in a Python process of its own."""
    import mineru_vram

    src = str(Path(mineru_vram.__file__).resolve().parents[1])
    here = str(Path(__file__).resolve().parent)
    env_path = json.dumps([src])

    def one(path: Path) -> tuple[str, dict[str, Any]]:
        done = subprocess.run(
            [sys.executable, "-c", _FRESH_CHILD, env_path, here, str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            return path.name, {"verdict": f"crashed:{done.returncode}", "message": done.stderr[-500:], "pages": None}
        return path.name, json.loads(done.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, pdfs))


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["verdict"], a["message"], a["pages"]) == (b["verdict"], b["message"], b["pages"])


def run_mineru(paths: list[Path], verdicts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Parse each file with MinerU's flash tier on the CPU; record how it ended."""
    import mineru_vram as mv

    out: dict[str, dict[str, Any]] = {}
    with mv.ModelSession("flash", device="cpu") as session:
        for path in paths:
            t0 = time.perf_counter()
            try:
                result = session.parse(path, name=path.name, ocr_mode="txt")
            except mv.ParseError as exc:
                doubt = verdicts[path.name]["message"] if verdicts[path.name]["verdict"] == "doubtful" else None
                outcome = {
                    "outcome": "ParseError",
                    "names_document": getattr(exc, "document", None) == path.name and path.name in str(exc),
                    "carries_doubt": doubt is None or doubt in str(exc),
                    "message": str(exc)[:400],
                }
            except mv.MineruVramError as exc:
                outcome = {"outcome": type(exc).__name__, "message": str(exc)[:400]}
            except Exception as exc:  # untyped: a finding
                outcome = {"outcome": f"untyped:{type(exc).__name__}", "message": str(exc)[:400]}
            else:
                outcome = {"outcome": "parsed", "pages": result.page_count}
            outcome["seconds"] = round(time.perf_counter() - t0, 3)
            out[path.name] = outcome
    return out


def cut_files(pdfs: list[Path], count: int, seed: int) -> dict[str, Any]:
    """Judge prefixes (10/50/90/99 %) of ``count`` files, in one process, in random order."""
    rng = random.Random(seed)
    chosen = rng.sample(pdfs, min(count, len(pdfs)))
    jobs = [(p, frac) for p in chosen for frac in (0.1, 0.5, 0.9, 0.99)]
    rng.shuffle(jobs)
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for path, frac in jobs:
        data = path.read_bytes()
        table[f"{int(frac * 100)}%"][judge(path, data[: int(len(data) * frac)])["verdict"]] += 1
    return {"files": len(chosen), "by_cut": {k: dict(v) for k, v in sorted(table.items())}}


def corpus_commit(root: Path, given: str | None) -> str | None:
    if given:
        return given
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def write_subset(
    target: Path, pdfs: list[Path], peer: dict[str, tuple[str, str]], verdicts: dict[str, dict[str, Any]], args: Any
) -> None:
    """Copy the files the subset rule picks, with what the peer and we say of each, into ``target``.

    The rule: every file whose verdict is not a plain acceptance, every file the peer rejects,
    needs a password for or fails a page of, every file the old fixed-tail %%EOF rule
    rejected (no %%EOF in the last 8 KiB), and a seeded sample of ordinary files the peer
    opens; none over ``--subset-max-kib``.
    """
    limit = args.subset_max_kib * 1024
    by_name = {p.name: p for p in pdfs}
    why: dict[str, str] = {}
    for name, path in by_name.items():
        size = path.stat().st_size
        if size > limit:
            continue
        if verdicts[name]["verdict"] != "accepted":
            why[name] = f"verdict {verdicts[name]['verdict']}"
        elif peer.get(name, ("none",))[0] in ("rejects", "password", "page-fails"):
            why[name] = f"peer {peer[name][0]}"
        elif b"%%EOF" not in path.read_bytes()[-8192:]:
            why[name] = "no %%EOF in the last 8 KiB"
    ordinary = sorted(
        n
        for n, p in by_name.items()
        if n not in why and peer.get(n, ("none",))[0] == "opens" and p.stat().st_size < 20_000
    )
    for name in random.Random(args.seed).sample(ordinary, min(args.subset_ordinary, len(ordinary))):
        why[name] = "ordinary sample"
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in sorted(why):
        data = by_name[name].read_bytes()
        shutil.copyfile(by_name[name], target / name)
        kind, note = peer.get(name, ("none", "no expectation"))
        files[name] = {
            "peer": kind,
            "peer_note": note,
            "verdict": verdicts[name]["verdict"],
            "pages": verdicts[name]["pages"],
            "why_chosen": why[name],
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    licence = Path(args.pdfjs) / "LICENSE"
    if licence.exists():
        shutil.copyfile(licence, target / "LICENSE-pdf.js")
    spec = {
        "source": "https://github.com/mozilla/pdf.js (test/pdfs)",
        "commit": corpus_commit(Path(args.pdfjs), args.commit),
        "rule": write_subset.__doc__.split("\n\n")[1].strip().replace("\n    ", " ").replace("\n", " "),
        "verdicts_from": {
            "all": "a process of its own per file",
            "failing": "a process of its own per file not plainly accepted; one process, random order, for the rest",
            "none": "one process, random order",
        }[args.fresh],
        "files": files,
    }
    (target / "expectations.json").write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    total = sum(f["bytes"] for f in files.values())
    print(f"wrote {len(files)} files ({total / 1024:.0f} KiB) to {target}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--pdfjs", help="a pdf.js checkout (test/pdfs, test/test_manifest.json, test/unit/api_spec.js)")
    where.add_argument("--subset", help="a folder with expectations.json, as written by --write-subset")
    ap.add_argument("--commit", help="the pdf.js commit, where the checkout is not a git repository")
    ap.add_argument("--seed", type=int, default=20261127)
    ap.add_argument("--fresh", choices=("none", "failing", "all"), default="failing",
                    help="judge files in a process each: none, those not plainly accepted, or all")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="fresh processes at a time")
    ap.add_argument("--mineru", action="store_true", help="parse what we let through with MinerU (flash, CPU)")
    ap.add_argument("--cuts", type=int, default=0, help="judge prefixes of this many files the peer opens")
    ap.add_argument("--write-subset", help="copy the subset rule's files and expectations.json here")
    ap.add_argument("--subset-max-kib", type=int, default=64)
    ap.add_argument("--subset-ordinary", type=int, default=12)
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)

    if args.pdfjs:
        pdfs, peer = load_pdfjs(Path(args.pdfjs))
        commit = corpus_commit(Path(args.pdfjs), args.commit)
    else:
        pdfs, peer, spec = load_subset(Path(args.subset))
        commit = spec.get("commit")

    t0 = time.perf_counter()
    first = judge_in_order(pdfs, args.seed)
    second = judge_in_order(pdfs, args.seed + 1)
    judged_s = time.perf_counter() - t0
    order_diffs = sorted(n for n in first if not same(first[n], second[n]))
    fresh_names = [
        p for p in pdfs if args.fresh == "all" or (args.fresh == "failing" and first[p.name]["verdict"] != "accepted")
    ]
    fresh = judge_fresh(fresh_names, args.jobs) if fresh_names else {}
    fresh_diffs = sorted(n for n in fresh if not same(fresh[n], first[n]))

    rows = []
    for path in pdfs:
        kind, note = peer.get(path.name, ("none", "no expectation"))
        v = first[path.name]
        if kind in OPENING and v["verdict"] in REJECTING:
            finding = "false rejection"
        elif kind == "password" and v["verdict"] in REJECTING and v["verdict"] != "encrypted":
            finding = "wrong class"
        elif v["verdict"].startswith("untyped"):
            finding = "untyped error"
        else:
            finding = ""
        rows.append({"file": path.name, "peer": kind, "peer_note": note, **v, "finding": finding})

    needs_mineru = [
        Path(p) for p in pdfs
        if first[p.name]["verdict"] == "doubtful"
        or (peer.get(p.name, ("none",))[0] in ("rejects", "page-fails") and first[p.name]["verdict"] == "accepted")
    ]  # fmt: skip
    mineru = run_mineru(needs_mineru, first) if args.mineru and needs_mineru else {}
    for row in rows:
        if row["file"] in mineru:
            row["mineru"] = mineru[row["file"]]
            outcome = mineru[row["file"]]
            if outcome["outcome"] not in ("ParseError", "parsed"):
                row["finding"] = (row["finding"] + "; " if row["finding"] else "") + f"MinerU: {outcome['outcome']}"
            elif outcome["outcome"] == "ParseError" and not (outcome["names_document"] and outcome["carries_doubt"]):
                row["finding"] = (row["finding"] + "; " if row["finding"] else "") + "ParseError lacks name or doubt"

    cuts = {}
    if args.cuts:
        opened = [
            p for p in pdfs if peer.get(p.name, ("none",))[0] == "opens" and first[p.name]["verdict"] == "accepted"
        ]
        cuts = cut_files(opened, args.cuts, args.seed)

    by_peer: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in rows:
        by_peer[row["peer"]][row["verdict"]] += 1
    report = {
        "date": datetime.date.today().isoformat(),
        "corpus": "pdf.js test/pdfs" + (" (subset)" if args.subset else ""),
        "corpus_commit": commit,
        "files": len(pdfs),
        "seed": args.seed,
        "seconds_to_judge_all_twice": round(judged_s, 2),
        "verdicts": dict(collections.Counter(r["verdict"] for r in rows)),
        "by_peer_expectation": {k: dict(v) for k, v in sorted(by_peer.items())},
        "false_rejections": [r["file"] for r in rows if r["finding"].startswith("false rejection")],
        "wrong_class": [r["file"] for r in rows if "wrong class" in r["finding"]],
        "findings": {r["file"]: r["finding"] for r in rows if r["finding"]},
        "order": {"second_order_differs": order_diffs, "fresh_checked": len(fresh), "fresh_differs": fresh_diffs},
        "mineru": {
            "given": len(mineru),
            "outcomes": dict(collections.Counter(m["outcome"] for m in mineru.values())),
            "peer_rejects_we_accept": sorted(
                r["file"]
                for r in rows
                if r["peer"] in ("rejects", "page-fails") and r["verdict"] in ("accepted", "doubtful")
            ),
        },
        "cuts": cuts,
        "not_accepted": [r for r in rows if r["verdict"] != "accepted"],
        "versions": _versions(),
    }
    if args.write_subset:
        if not args.pdfjs:
            ap.error("--write-subset needs --pdfjs")
        # Fresh-process verdicts where there are some: the subset's test compares one process against them.
        write_subset(Path(args.write_subset), pdfs, peer, {**first, **fresh}, args)
    text = json.dumps(report, indent=1, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    summary = {k: report[k] for k in ("date", "corpus_commit", "files", "verdicts", "by_peer_expectation",
                                      "false_rejections", "wrong_class", "order", "mineru", "cuts")}  # fmt: skip
    print(json.dumps(summary, indent=1))
    return 0 if not report["findings"] and not order_diffs and not fresh_diffs else 1


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("pypdfium2", "mineru", "mineru-vram"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import pypdfium2.version as v

        out["pdfium"] = str(v.PDFIUM_INFO)
    except Exception:
        pass
    return out


if __name__ == "__main__":  # MinerU's renderer starts workers with spawn, which re-imports this script
    sys.exit(main())

"""Writing and reading bundles on disk: the only place the compiler writes files.

A bundle is written into a temporary sibling directory and renamed into place, so a reader
never sees half a bundle; an existing bundle is replaced only with `force`, and a bundle
that has been submitted (it holds `submission.json`) keeps that record across a rewrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SUBMISSION = "submission.json"
EXECUTABLE = (".sh",)


class BundleError(Exception):
    """A bundle cannot be written or read (exit code 1, one clear line)."""

    exit_code = 1


def write_bundle(files: dict[str, str], out_dir: str | Path, *, force: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / MANIFEST).is_file():
        raise BundleError(f"{out} exists and is not an rlspec bundle; refusing to replace it")
    if out.exists() and (out / SUBMISSION).is_file():
        raise BundleError(
            f"{out} has been submitted ({SUBMISSION}); compile into a new directory, or "
            f"cancel it and remove {out / SUBMISSION} first"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, text in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            os.chmod(path, 0o755 if rel.endswith(EXECUTABLE) else 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not an rlspec bundle (no {MANIFEST}); run `rlspec compile`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); recompile the bundle") from exc


def verify_bundle(bundle: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Files whose content no longer matches the manifest (edited by hand, or missing)."""
    bad = []
    for rel, digest in manifest["files"].items():
        path = Path(bundle) / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(f"{rel} (changed)")
    return bad

"""Writing and reading bundles on disk: the only place the compiler writes files.

A bundle is written into a temporary sibling directory and renamed into place, so a reader
never sees half a bundle. An existing bundle is replaced only with `force`, and never one
that has been submitted (it holds `submission.json`). What the old bundle did not write (the
run directory of `cluster.output_dir: runs`, logs, a user's notes: `foreign_paths`) is moved
into the new one, never deleted.
"""

from __future__ import annotations

import errno
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


class BundleInputError(BundleError):
    """A path or bundle file the user gave that cannot be used (bad input: exit code 2)."""

    exit_code = 2


def _unwritable(out_dir: str | Path, out: Path, exc: OSError) -> BundleInputError:
    """An OSError of creating the bundle's directory, in a person's words."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        why = f"{exc.filename or out.parent} is a file, not a directory"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"{out.parent} is not writable ({exc.strerror})"
    else:
        why = f"no directory can be created in {out.parent} ({exc.strerror})"
    return BundleInputError(f"cannot write the bundle to {out_dir}: {why}; "
                            "choose an output directory you can write (-o)")


def foreign_paths(out: Path) -> list[str]:
    """What ``out``, an existing bundle, holds that its manifest did not write: each a file,
    or a folder none of whose contents it wrote, relative to ``out``."""
    try:
        written = set(json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleInputError(f"{out / MANIFEST} cannot be read ({exc}): what the bundle wrote "
                               "is unknown, so --force cannot keep the rest; compile into "
                               "another directory") from None
    written.add(MANIFEST)
    found: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        for entry in sorted(folder.iterdir()):
            rel = prefix + entry.name
            if rel in written:
                continue
            if entry.is_dir() and not entry.is_symlink() and any(
                    w.startswith(rel + "/") for w in written):
                walk(entry, rel + "/")
            else:
                found.append(rel)

    walk(out, "")
    return found


def _carry(out: Path, tmp: Path, keep: list[str], files: dict[str, str]) -> list[str]:
    """Move ``keep`` from the old bundle ``out`` into the new one ``tmp``; what was moved."""
    clash = [rel for rel in keep if any(f == rel or f.startswith(rel + "/") or
                                        rel.startswith(f + "/") for f in files)]
    if clash:
        raise BundleInputError(f"{out} holds {', '.join(clash)}, which the old bundle did not "
                               "write and the new one would: move it out of the bundle first")
    moved: list[str] = []
    try:
        for rel in keep:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(out / rel, tmp / rel)
            moved.append(rel)
    except BaseException:
        for rel in moved:  # nothing a user wrote is left in the discarded directory
            os.rename(tmp / rel, out / rel)
        raise
    return moved


def write_bundle(files: dict[str, str], out_dir: str | Path, *, force: bool = False,
                 kept: list[str] | None = None) -> Path:
    """Write ``files`` as the bundle ``out_dir`` (module doc); with ``kept``, a list, the
    paths carried over from the bundle it replaced are appended to it."""
    if not str(out_dir).strip():  # Path("") is ".": an empty -o would replace the cwd
        raise BundleInputError("the output directory is empty; name one, e.g. -o bundles/run1")
    # Resolved first: `-o .` (or `..`) names the directory by its real name, which the
    # temporary sibling and the rename need.
    out = Path(out_dir).resolve()
    if not out.name:
        raise BundleInputError(f"{out_dir} cannot be a bundle directory; name a new one (-o)")
    if out.exists() and not force:
        raise BundleInputError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / MANIFEST).is_file():
        raise BundleInputError(f"{out} exists and is not an rlspec bundle; refusing to replace it")
    if out.exists() and (out / SUBMISSION).is_file():
        raise BundleInputError(
            f"{out} has been submitted ({SUBMISSION}); compile into a new directory, or "
            f"cancel it and remove {out / SUBMISSION} first"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise _unwritable(out_dir, out, exc) from None
    try:
        for rel, text in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            os.chmod(path, 0o755 if rel.endswith(EXECUTABLE) else 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            moved = _carry(out, tmp, foreign_paths(out), files)
            if kept is not None:
                kept.extend(moved)
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old, out)
                    raise
            except BaseException:  # back where they were, before tmp is removed
                for rel in moved:
                    os.rename(tmp / rel, out / rel)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# The manifest's keys that the commands read, with their JSON types, and those of each job.
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string"}
_MANIFEST_KEYS = {"order": list, "jobs": dict, "files": dict, "overrides": list,
                  "scheduler": str, "env_passthrough": list}
_JOB_KEYS = {"launch": str, "depends_on": list, "resources": dict}
_RESOURCE_KEYS = ("job_name", "nodes", "cpus_per_task", "time", "gpus_per_node", "extra")


def _manifest_problem(data: Any) -> str | None:
    """What makes parsed JSON not a manifest (the keys the commands read), or None."""
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean",
                type(None): "null"}.get(type(data), "a number")
        return f"it holds {kind}, not an object"
    for key, tp in _MANIFEST_KEYS.items():
        if not isinstance(data.get(key), tp):
            return f"{key!r} is missing or not {_JSON_TYPES[tp]}"
    for name in data["order"]:
        job = data["jobs"].get(name) if isinstance(name, str) else None
        if not isinstance(job, dict):
            return f"job {name!r} of 'order' is not an object in 'jobs'"
        for key, tp in _JOB_KEYS.items():
            if not isinstance(job.get(key), tp):
                return f"jobs.{name}.{key} is missing or not {_JSON_TYPES[tp]}"
        missing = [k for k in _RESOURCE_KEYS if k not in job["resources"]]
        if missing:
            return f"jobs.{name}.resources lacks {', '.join(missing)}"
    return None


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    if not Path(bundle).exists():  # a mistyped path says so, not "not a bundle"
        raise BundleInputError(f"{bundle} does not exist; give a bundle directory (check the path)")
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleInputError(
            f"{bundle} is not an rlspec bundle (no {MANIFEST}); run `rlspec compile`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise BundleInputError(f"{path} is not valid JSON ({exc}); recompile the bundle") from None
    problem = _manifest_problem(data)
    if problem:
        raise BundleInputError(f"{path} is not a valid rlspec manifest ({problem}); "
                               "recompile the bundle")
    return data


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

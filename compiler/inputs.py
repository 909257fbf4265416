"""The user's own files a spec names (checkpoints, tokenizer, prompt files, the screen's proxy
model): where a relative path points, and whether a local run will find them.

A relative path is read from the spec's folder, as the user wrote it beside the spec: the
compiler makes it absolute (``anchored``), so every job finds the same file wherever the
bundle is written. On ``cluster.scheduler: local`` the jobs run on this machine, so a file
that is not here is an error now rather than at the job's start (``missing_inputs``); on
Slurm the nodes' mounts may hold what the login node cannot see, so only a path that the
spec's container would not see (under none of ``cluster.container.mounts``) is said
(``unmounted_inputs``, a warning: the image itself may hold it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spec.errors import Problem
from spec.models import OfflinePassRate, Spec

__all__ = ["anchored", "bundle_input_overrides", "missing_inputs", "unmounted_inputs"]


def _inputs(spec: Spec) -> Iterator[tuple[tuple[Any, ...], str, str]]:
    """(spec path, value, "file" | "folder") of each user file the spec names."""
    if spec.model.checkpoint is not None:
        yield ("model", "checkpoint"), spec.model.checkpoint, "folder"
    if spec.model.tokenizer is not None:
        yield ("model", "tokenizer"), spec.model.tokenizer, "folder"
    if spec.data.generator is None and spec.data.train is not None:
        yield ("data", "train"), spec.data.train, "file"
    if spec.data.eval is not None:
        yield ("data", "eval"), spec.data.eval, "file"
    for i, stage in enumerate(spec.filters):
        if isinstance(stage, OfflinePassRate) and stage.proxy_model != "policy":
            yield ("filters", i, "proxy_model"), stage.proxy_model, "folder"


def anchored(spec: Spec, base: Path) -> Spec:
    """``spec`` with each relative input path made absolute against ``base`` (the spec's
    folder), and ``~`` expanded (in ``cluster.output_dir`` too); absolute paths are kept."""
    model, data = dict(spec.model), dict(spec.data)
    filters = list(spec.filters)
    changed = False
    for path, value, _ in _inputs(spec):
        given = Path(value).expanduser()  # ~ is the submitting user's home, as on the nodes
        absolute = str(given if given.is_absolute() else (base / given).resolve())
        if absolute == value:
            continue
        changed = True
        if path[0] == "model":
            model[path[1]] = absolute
        elif path[0] == "data":
            data[path[1]] = absolute
        else:
            filters[path[1]] = filters[path[1]].model_copy(update={"proxy_model": absolute})
    cluster = spec.cluster
    if cluster.output_dir.startswith("~"):  # a shell would expand it; the quoted path does not
        cluster = cluster.model_copy(update={"output_dir": str(Path(cluster.output_dir).expanduser())})
        changed = True
    if not changed:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update=model),
                                   "data": spec.data.model_copy(update=data),
                                   "filters": filters, "cluster": cluster})


def missing_inputs(spec: Spec) -> list[Problem]:
    """On a local run, the input paths (anchored) that this machine does not have."""
    if spec.cluster.scheduler != "local":
        return []
    problems = []
    for path, value, kind in _inputs(spec):
        found = Path(value)
        if (found.is_file() if kind == "file" else found.is_dir()):
            continue
        what = f"no {kind} {value}" + (" (it is a folder)" if kind == "file" and found.is_dir()
                                       else " (it is a file)" if found.is_file() else "")
        problems.append(Problem(path, f"{what}: the local run's jobs would not find it",
                                "fix the path (a relative one is read from the spec's folder)"))
    return problems


def unmounted_inputs(spec: Spec) -> list[Problem]:
    """Warnings for the input paths (anchored) under none of the container's mount points."""
    container = spec.cluster.container
    if container is None or spec.cluster.scheduler != "slurm":
        return []
    # pyxis also mounts the user's home unless told not to (--no-container-mount-home).
    points = [Path(m.split(":")[1] if ":" in m else m) for m in container.mounts] + [Path.home()]
    problems = []
    for path, value, _ in _inputs(spec):
        if not any(Path(value).is_relative_to(point) for point in points):
            problems.append(Problem(
                path, f"{value} is under none of cluster.container.mounts "
                f"({', '.join(container.mounts) or 'none'}): the jobs in the container would "
                "not see it, unless the image holds it",
                "add its folder to cluster.container.mounts (SRC:DST)", severity="warning"))
    return problems


def bundle_input_overrides(bundle: Path, overrides: list[str]) -> list[str]:
    """``--set`` overrides that give a bundle's ``spec.yaml`` (the user's text, relative paths
    and all; with the bundle's ``overrides``) the input paths its compile anchored, from its
    ``spec.resolved.yaml``: a bundle is read where it lies, not where its spec was."""
    import yaml

    from spec.loader import load_spec

    source = load_spec(bundle / "spec.yaml", overrides)
    resolved = yaml.safe_load((bundle / "spec.resolved.yaml").read_text(encoding="utf-8"))
    sets = []
    for path, _, _ in _inputs(source.spec):
        value: Any = resolved
        for part in path:
            value = value[part]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        sets.append(f"{key}='{str(value).replace(chr(39), chr(39) * 2)}'")
    return sets

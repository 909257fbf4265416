"""What every job entry point shares: its config, artifact paths, atomic outputs, logging, exit codes.

A job runs as ``python -m runtime.jobs.<entry> --config jobs/<job>/config.json`` with
cwd = ``$RLSPEC_RUN_DIR``; the launch script exports ``RLSPEC_RUN_DIR`` and
``RLSPEC_BUNDLE_DIR``. The config is plain JSON (the runtime never imports ``compiler``)::

    {"job": str, "entry": str, "inputs": {name: artifact}, "outputs": {name: artifact},
     "spec": the resolved spec, "derived": the compiler's plan, "rlspec_version": str}
    artifact = {"path": str, "kind": str, "external": bool}

The spec is validated once at load with ``spec.models.Spec``, the one typed model of a spec
and the one place of its defaults: ``ctx.model_spec`` is the model, ``ctx.spec`` its JSON
dump, where every key is present (a key the config leaves out gets the model's default).
An invalid spec is a JobError naming its first problems.

Artifact paths resolve as::

    produced by a job (external = false)   → $RLSPEC_RUN_DIR / path
    given by the user, absolute            → path
    given by the user, relative            → $RLSPEC_BUNDLE_DIR/.. / path (the compiler
                                             makes each absolute, from the spec's folder:
                                             only a hand-edited config has one)

Outputs are directories (written with ``runtime.files``, re-exported here). One is
*complete* when it holds the marker file ``.complete``,
written last (``atomic_dir`` writes it into a temporary sibling and renames the directory
into place, so a reader never sees a half-written output under the final name). A job
whose every output is complete logs "outputs exist, skipping" and exits 0: re-running a
bundle resumes its graph where it stopped. Temporary siblings left by a killed job
(``.<name>.partial-*``) are never mistaken for outputs and are removed by the next run.

Exit codes of ``run_job``: 0 done or skipped, 1 failed (one line on stderr, the traceback
in the job's log file ``$RLSPEC_RUN_DIR/logs/<job>.log``), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM, what Slurm sends on cancel or time-out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from runtime.errors import JobError
from runtime.files import (
    COMPLETE_MARKER,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    clean_partials,
    fsync_tree,
    is_complete,
    link_tree,
    mark_complete,
    read_jsonl,
)
from runtime.preflight import preflight_context
from spec.errors import dotted
from spec.loader import problems_from_validation
from spec.models import Spec

_T = TypeVar("_T")

__all__ = [
    "COMPLETE_MARKER",
    "ArtifactRef",
    "JobContext",
    "JobError",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "clean_partials",
    "fsync_tree",
    "is_complete",
    "job_logger",
    "link_tree",
    "mark_complete",
    "parse_args",
    "read_jsonl",
    "run_job",
]



# --------------------------------------------------------------------------- logging


class _Prefix(logging.Formatter):
    def __init__(self, job: str) -> None:
        super().__init__()
        self.job = job

    def format(self, record: logging.LogRecord) -> str:
        # Same shape as the launch scripts' `rlspec_log` lines.
        stamp = time.strftime("%H:%M:%S", time.gmtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"[rlspec {stamp}] {self.job}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def job_logger(job: str, log_file: Path | None = None) -> logging.Logger:
    """A logger whose lines read ``[rlspec HH:MM:SS] <job>: message``: INFO and up on
    stderr, everything (tracebacks included) appended to ``log_file``."""
    logger = logging.getLogger(f"rlspec.job.{job}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.INFO)
    err.setFormatter(_Prefix(job))
    logger.addHandler(err)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(_Prefix(job))
        logger.addHandler(fh)
    return logger


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class ArtifactRef:
    """One input or output of a job, its path resolved."""

    name: str
    path: Path
    kind: str
    external: bool


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).resolve() if value else None


_SHOWN_PROBLEMS = 3  # a failure is one line: the first few problems, then a count


def _validate_spec(raw: Any, config_path: Path) -> Spec:
    """``raw`` (the config's "spec") as a Spec; a one-line JobError naming its first problems."""
    if raw is None:
        raise JobError(f"config {config_path} has no spec")
    try:
        # As JSON, which it is: strict mode judges JSON input by JSON's own types.
        return Spec.model_validate_json(json.dumps(raw))
    except ValidationError as err:
        problems = problems_from_validation(err, raw)
    shown = "; ".join(f"spec.{dotted(p.path)}: {p.message}" if p.path else f"spec: {p.message}"
                      for p in problems[:_SHOWN_PROBLEMS])
    more = len(problems) - _SHOWN_PROBLEMS
    if more > 0:
        shown += f"; and {more} more"
    raise JobError(f"config {config_path} has an invalid spec ({' '.join(shown.split())}); "
                   "recompile the bundle with this rlspec") from None


class JobContext:
    """A job's view of its bundle: config sections, resolved artifact paths, logger."""

    def __init__(self, config: Mapping[str, Any], *, config_path: Path, run_dir: Path,
                 bundle_dir: Path, log_to_file: bool = True) -> None:
        self.config: dict[str, Any] = dict(config)
        self.config_path = config_path
        self.run_dir = run_dir
        self.bundle_dir = bundle_dir
        self.job: str = str(config.get("job") or config_path.parent.name)
        self.entry: str = str(config.get("entry") or self.job)
        self.model_spec: Spec = _validate_spec(config.get("spec"), config_path)
        # Plain data for the jobs, every key present: defaults come from the model only.
        self.spec: dict[str, Any] = self.model_spec.model_dump(mode="json")
        self.derived: dict[str, Any] = dict(config.get("derived") or {})
        self._closers: list[Callable[[], None]] = []  # closing(): run by run_job at the end
        self.inputs = {n: self._resolve(n, a) for n, a in (config.get("inputs") or {}).items()}
        self.outputs = {n: self._resolve(n, a) for n, a in (config.get("outputs") or {}).items()}
        self.log_file: Path | None = run_dir / "logs" / f"{self.job}.log" if log_to_file else None
        self.log = job_logger(self.job, self.log_file)

    @classmethod
    def load(cls, config_path: str | os.PathLike[str], *, run_dir: str | os.PathLike[str] | None = None,
             bundle_dir: str | os.PathLike[str] | None = None,
             log_to_file: bool = True) -> JobContext:
        """Read ``config_path``. The run dir is ``run_dir``, else ``$RLSPEC_RUN_DIR``, else the
        cwd; the bundle dir ``bundle_dir``, else ``$RLSPEC_BUNDLE_DIR``, else the folder two
        levels above the config (``<bundle>/jobs/<job>/config.json``)."""
        path = Path(config_path).resolve()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobError(f"config not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise JobError(f"config {path} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise JobError(f"config {path} is not a JSON object")
        run = Path(run_dir).resolve() if run_dir else (_env_path("RLSPEC_RUN_DIR") or Path.cwd())
        bundle = (Path(bundle_dir).resolve() if bundle_dir
                  else (_env_path("RLSPEC_BUNDLE_DIR") or path.parents[2]))
        return cls(config, config_path=path, run_dir=run, bundle_dir=bundle,
                   log_to_file=log_to_file)

    def _resolve(self, name: str, artifact: Mapping[str, Any]) -> ArtifactRef:
        raw = Path(str(artifact.get("path", "")))
        external = bool(artifact.get("external", False))
        if external:
            path = raw if raw.is_absolute() else self.bundle_dir.parent / raw
        else:
            path = self.run_dir / raw
        return ArtifactRef(name, Path(os.path.normpath(path)), str(artifact.get("kind", "")),
                           external)

    # ----- paths

    def input_path(self, name: str, *, check: bool = True) -> Path:
        """Path of input ``name``. With ``check``, a missing input (or an incomplete one made
        by another job) is a JobError naming the job to run first."""
        try:
            ref = self.inputs[name]
        except KeyError:
            raise JobError(f"job {self.job} has no input {name!r} "
                           f"(inputs: {', '.join(self.inputs) or 'none'})") from None
        if check:
            if ref.external and not ref.path.exists():
                raise JobError(f"input {name} not found: {ref.path}")
            if not ref.external and not is_complete(ref.path):
                raise JobError(f"input {name} at {ref.path} is missing or incomplete "
                               f"(no {COMPLETE_MARKER}): run the job that produces it first")
        return ref.path

    def input_of_kind(self, kind: str) -> Path:
        """Path of the one input of artifact kind ``kind`` (the RL job's HF policy is
        ``policy_sft`` after SFT, else ``policy_init``), checked as :meth:`input_path`."""
        names = [n for n, ref in self.inputs.items() if ref.kind == kind]
        if len(names) != 1:
            raise JobError(f"job {self.job} has {len(names)} inputs of kind {kind!r} "
                           f"({', '.join(names) or 'none'}); expected one")
        return self.input_path(names[0])

    def output_path(self, name: str) -> Path:
        """Final path of output ``name`` (write it through ``atomic_dir``)."""
        try:
            return self.outputs[name].path
        except KeyError:
            raise JobError(f"job {self.job} has no output {name!r} "
                           f"(outputs: {', '.join(self.outputs) or 'none'})") from None

    def outputs_complete(self) -> bool:
        """True when the job has outputs and every one of them is complete."""
        return bool(self.outputs) and all(is_complete(o.path) for o in self.outputs.values())

    def atomic_output(self, name: str, **marker_info: Any) -> contextlib.AbstractContextManager[Path]:
        """``atomic_dir`` for output ``name``; the marker records the job and artifact."""
        return atomic_dir(self.output_path(name), job=self.job, artifact=name, **marker_info)

    # ----- spec access

    @property
    def startup_timeout_s(self) -> float:
        """How long the job waits for its engines (and trainer) to come up: the spec's
        ``system.startup_timeout_s``, or RLSPEC_STARTUP_TIMEOUT where set."""
        return float(os.environ.get("RLSPEC_STARTUP_TIMEOUT")
                     or self.model_spec.system.startup_timeout_s)

    @property
    def rollout_timeout_s(self) -> float:
        """The fixed part of how long one generation request may take before it is retried on
        another replica (RLSPEC_ROLLOUT_TIMEOUT; 600 s): the client adds the time its
        ``max_tokens`` take at a decode floor (``runtime.rollout.request_time``). An engine
        that generates no token that long with requests in flight is hung: its requests are
        cut then (``runtime.rollout.stall``)."""
        return float(os.environ.get("RLSPEC_ROLLOUT_TIMEOUT") or 600.0)

    def closing(self, resource: _T) -> _T:
        """``resource``, whose ``close()`` ``run_job`` calls when the job ends, failed or not
        (a rollout client's requests in flight are cut then, not waited for at exit)."""
        self._closers.append(resource.close)  # type: ignore[attr-defined]
        return resource

    def engine_stalled(self, endpoint: str, seconds: float) -> None:
        """The rollout client's word that an engine generated nothing for ``seconds`` with
        requests in flight (``runtime.rollout.stall``): its requests are cut and retried."""
        self.log.warning("engine %s generated no token for %.0f s with requests in flight: "
                         "its requests are cut and sent to another replica (see its log)",
                         endpoint, seconds)

    def engine_concurrency(self, seq_len: int | None = None) -> int:
        """Sequences one rollout engine replica runs at once (what the client's request limits
        count waves of, ``runtime.rollout.request_time``): ``rollout.max_num_seqs``, or fewer
        where the compiler's estimate of its KV cache (``rollout_max_sequences`` full-length
        sequences of ``seq_len`` tokens) holds fewer sequences of ``seq_len`` tokens — vLLM
        queues the rest. Without an estimate (CPU runs), ``max_num_seqs``."""
        most = self.model_spec.rollout.max_num_seqs
        fit, planned = (int(self.derived.get(k) or 0) for k in ("rollout_max_sequences",
                                                                   "seq_len"))
        if fit > 0:
            if seq_len and planned:
                fit = fit * planned // max(1, seq_len)
            most = max(1, min(most, fit))
        return most

    def section(self, dotted: str) -> Any:
        """``spec`` value at a dotted path (``"data.generator"``); a JobError if absent."""
        node: Any = self.spec
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise JobError(f"the job config has no spec.{dotted}")
            node = node[part]
        return node

    @property
    def rank(self) -> int:
        """This process's rank: torchrun's global RANK where a node runs several ranks (the
        Megatron SFT), else the task rank of a one-task-per-node job (Slurm's SLURM_PROCID);
        0 when run locally."""
        return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def single_input(ctx: JobContext, kind: str) -> str:
    """The name of the job's single input of ``kind``; a JobError if there is not one."""
    names = [n for n, ref in ctx.inputs.items() if ref.kind == kind]
    if len(names) != 1:
        raise JobError(f"job {ctx.job} needs exactly one {kind} input, has "
                       f"{', '.join(names) or 'none'}")
    return names[0]


def single_output(ctx: JobContext) -> str:
    """The name of the job's single output; a JobError if there is not one."""
    if len(ctx.outputs) != 1:
        raise JobError(f"job {ctx.job} needs exactly one output, has {', '.join(ctx.outputs)}")
    return next(iter(ctx.outputs))



# --------------------------------------------------------------------------- entry points


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The command line every job takes: ``--config PATH [--force]``."""
    first = (description or "").strip().splitlines()
    parser = argparse.ArgumentParser(description=first[0] if first else None)
    parser.add_argument("--config", required=True, help="the job's config.json in the bundle")
    parser.add_argument("--force", action="store_true",
                        help="run even if every output already exists and is complete")
    return parser.parse_args(argv)


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


class _Terminated(BaseException):
    """SIGTERM turned into an exception, so ``atomic_dir`` removes its temporary."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _quiet_progress_bars() -> None:
    """No tqdm bars in job logs: huggingface_hub reads the variable when first imported;
    transformers, if a job module imported it already, is told directly."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        hf_logging.disable_progress_bar()


def run_job(fn: Callable[[JobContext], None], argv: Sequence[str] | None = None, *,
            description: str | None = None) -> int:
    """Run ``fn(ctx)`` as a job entry point; returns the process exit code.

    Skips (exit 0) when every output is already complete unless ``--force``; checks after
    ``fn`` that every output is complete; turns failures into one stderr line
    ``rlspec job <name> failed: <message> (log: <file>)`` and exit 1.
    """
    args = parse_args(argv, description)
    job = Path(args.config).parent.name or "?"
    try:
        ctx = JobContext.load(args.config)
    except Exception as exc:  # no context yet: no log file either
        print(f"rlspec job {job} failed: {_one_line(exc)} (log: none)", file=sys.stderr)
        return 1
    log_hint = str(ctx.log_file) if ctx.log_file else "stderr"
    previous = None
    with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        # submitit's --signal=USR2@90 reaches every job step before the time limit: a job
        # that runs on to SIGTERM stops as cleanly as it can (the default would end it now).
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        if ctx.outputs_complete() and not args.force:
            ctx.log.info("outputs exist, skipping (%s)",
                         ", ".join(str(o.path) for o in ctx.outputs.values()))
            return 0
        for out in ctx.outputs.values():
            for stale in clean_partials(out.path):
                ctx.log.info("removed the partial output of an earlier run: %s", stale)
        preflight_context(ctx)
        _quiet_progress_bars()
        t0 = time.monotonic()
        ctx.log.info("start (config %s, run dir %s)", ctx.config_path, ctx.run_dir)
        fn(ctx)
        missing = [n for n, o in ctx.outputs.items() if not is_complete(o.path)]
        if missing and ctx.rank == 0:
            raise JobError(f"finished without completing output(s) {', '.join(missing)}")
        ctx.log.info("done in %.1f s", time.monotonic() - t0)
        return 0
    except KeyboardInterrupt:
        ctx.log.debug("interrupted", exc_info=True)
        print(f"rlspec job {ctx.job} interrupted (log: {log_hint})", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"rlspec job {ctx.job} terminated by SIGTERM (log: {log_hint})", file=sys.stderr)
        return 143
    except Exception as exc:
        ctx.log.debug("failure:\n%s", traceback.format_exc().rstrip())
        print(f"rlspec job {ctx.job} failed: {_one_line(exc)} (log: {log_hint})", file=sys.stderr)
        return 1
    finally:
        for close in reversed(ctx._closers):
            try:
                close()
            except Exception:  # the job's outcome is decided: closing only tidies up
                ctx.log.debug("closing failed:\n%s", traceback.format_exc().rstrip())
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for handler in ctx.log.handlers:
            handler.flush()

"""Submitting a compiled bundle through submitit: the request is built first, then sent.

`plan_submission` is pure: manifest → the list of requests `submit` would send (what
`--dry-run` prints). `submit` sends them: on Slurm each job is an sbatch whose dependency is
`afterok` on the jobs it reads from; locally (scheduler local, or `--local`) the same launch
scripts run one after another in graph order, since submitit's local executor ignores
dependencies. A Slurm bundle never falls back to local: without `sbatch`/`srun` here it is
refused (`SlurmUnavailable`). The job ids are recorded in `submission.json` for `rlspec status`/`cancel`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compiler.bundle import (
    SUBMISSION,
    BundleError,
    BundleInputError,
    read_manifest,
    verify_bundle,
)
from compiler.processes import stop_tree

LOGS = "logs"


@dataclass(frozen=True)
class SubmitRequest:
    """One job as it will be sent: the executor's parameters and the command it runs."""

    job: str
    command: list[str]
    depends_on: list[str]
    parameters: dict[str, Any]


@dataclass
class Submission:
    """What was sent, recorded in the bundle (no secrets: only ids, names and states)."""

    backend: str  # slurm | local
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {id, state, log}

    def save(self, bundle: Path) -> None:
        tmp = bundle / f".{SUBMISSION}.tmp"
        # Jobs keep their insertion (graph) order: status lists them as they run.
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, bundle / SUBMISSION)

    @classmethod
    def load(cls, bundle: Path) -> Submission | None:
        path = bundle / SUBMISSION
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # not JSON, or not UTF-8
            data, problem = None, f"not JSON: {exc}"
        else:
            problem = _record_problem(data)
        if problem:
            raise BundleInputError(f"{path} is not a valid submission record ({problem}); "
                                   "check the jobs with squeue/sacct")
        return cls(backend=data["backend"], jobs=data["jobs"])


def _record_problem(data: Any) -> str | None:
    """What makes parsed JSON not a submission record, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("backend") not in ("slurm", "local"):
        return "'backend' is not slurm or local"
    if not isinstance(data.get("jobs"), dict):
        return "'jobs' is not an object of job name → {id, state}"
    for name, job in data["jobs"].items():
        if not (isinstance(job, dict) and isinstance(job.get("state"), str)
                and isinstance(job.get("id"), str | None)):
            return f"job {name!r} is not an object with a string 'state' and 'id'"
    return None


class SlurmUnavailable(BundleError):
    """A Slurm bundle submitted where Slurm's commands are not on PATH (bad input: exit 2)."""

    exit_code = 2


def choose_backend(manifest: dict[str, Any], *, local: bool = False) -> str:
    """The backend the bundle really runs on: local when asked (`--local`) or when the spec's
    scheduler is local; Slurm for a Slurm spec, which needs `sbatch` (to submit) and `srun`
    (the launch scripts start their steps with it) on PATH. A Slurm bundle without them is
    refused, never run here instead."""
    if local or manifest["scheduler"] == "local":
        return "local"
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise SlurmUnavailable(
            f"this bundle's spec has cluster.scheduler: slurm, but "
            f"{' and '.join(f'`{c}`' for c in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH here, so nothing was submitted; "
            "run `rlspec submit` on the cluster's login node (or load its Slurm module first), "
            "or compile the spec with cluster.scheduler: local to run it on this machine")
    return manifest["scheduler"]


def plan_submission(bundle: Path, manifest: dict[str, Any], backend: str) -> list[SubmitRequest]:
    """Pure: the requests `submit` sends, in order (dependencies named by job)."""
    requests = []
    for name in manifest["order"]:
        job = manifest["jobs"][name]
        res = job["resources"]
        params: dict[str, Any] = {"job_name": res["job_name"]}
        if backend == "slurm":
            params.update(
                nodes=res["nodes"],
                ntasks_per_node=1,
                cpus_per_task=res["cpus_per_task"],
                time=_minutes(res["time"]),
                # The launch script starts its own srun steps; run it once, on the batch host.
                use_srun=False,
                stderr_to_stdout=True,
                # A job whose dependency failed is cancelled (DependencyNeverSatisfied)
                # instead of waiting in the queue for ever. (submitit appends to the log of a
                # requeued job, and has Slurm send USR2 to every step before the time limit:
                # the launch scripts ignore it.)
                additional_parameters={"requeue": True, "kill-on-invalid-dep": "yes"},
            )
            if res["gpus_per_node"]:
                params["gpus_per_node"] = res["gpus_per_node"]
            if res.get("mem") is not None:
                params["mem"] = res["mem"]  # "0": all of the node's memory
            if res.get("exclusive"):
                params["exclusive"] = True
            params.update(res["extra"])
        requests.append(SubmitRequest(
            job=name,
            command=["bash", str((bundle / job["launch"]).resolve())],
            depends_on=list(job["depends_on"]),
            parameters=params,
        ))
    return requests


def _minutes(time: str) -> int:
    days, _, clock = time.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def preflight(bundle: Path, manifest: dict[str, Any], *, force: bool) -> None:
    """Refuse what would fail later: resubmission, edited files, missing secrets."""
    if (bundle / SUBMISSION).is_file() and not force:
        raise BundleInputError(
            f"{bundle} was already submitted (see `rlspec status {bundle}`); "
            "pass --force to submit it again"
        )
    changed = verify_bundle(bundle, manifest)
    if changed:
        raise BundleInputError(
            "files of the bundle differ from its manifest: " + ", ".join(changed)
            + "; recompile instead of editing generated files"
        )
    missing = [n for n in manifest["env_passthrough"] if n not in os.environ]
    if missing:
        raise BundleInputError(
            "cluster.env_passthrough names variables that are not set here: "
            + ", ".join(missing) + "; export them before submitting"
        )


def submit(bundle: str | Path, *, force: bool = False, backend: str | None = None,
           echo: Any = print) -> Submission:
    """Send every job of the bundle; returns (and records) what was sent."""
    import submitit  # only on submit: compile and validate stay fast

    root = Path(bundle).resolve()
    manifest = read_manifest(root)
    preflight(root, manifest, force=force)
    backend = backend or choose_backend(manifest)
    requests = plan_submission(root, manifest, backend)
    logs = root / LOGS
    logs.mkdir(exist_ok=True)
    record = Submission(backend=backend)

    if backend == "slurm":
        for req in requests:
            executor = submitit.SlurmExecutor(folder=logs)
            params = dict(req.parameters)
            deps = [record.jobs[d]["id"] for d in req.depends_on]
            if deps:
                params["dependency"] = "afterok:" + ":".join(deps)
            executor.update_parameters(**params)
            job = executor.submit(submitit.helpers.CommandFunction(req.command, cwd=str(root)))
            record.jobs[req.job] = {"id": str(job.job_id), "state": "SUBMITTED",
                                    "log": str(job.paths.stdout)}
            record.save(root)  # after every job: a failure part-way still leaves ids to cancel
            echo(f"submitted {req.job}: Slurm job {job.job_id}"
                 + (f" (afterok {', '.join(req.depends_on)})" if deps else ""))
        return record

    # Local: submitit's local executor, one job at a time, in graph order, with this
    # interpreter (the one rlspec is installed in) running the runtime.
    os.environ.setdefault("RLSPEC_PYTHON", sys.executable)
    for req in requests:
        failed = next((d for d in req.depends_on
                       if record.jobs.get(d, {}).get("state") != "COMPLETED"), None)
        if failed:
            record.jobs[req.job] = {"id": None, "state": "CANCELLED",
                                    "log": None, "reason": f"dependency {failed} did not complete"}
            record.save(root)
            continue
        executor = submitit.LocalExecutor(folder=logs)
        # submitit's local default is 2 minutes; the spec's time limit applies here too.
        executor.update_parameters(
            timeout_min=_minutes(manifest["jobs"][req.job]["resources"]["time"]))
        with _stderr_to(logs / f"{req.job}.controller.log"):
            job = executor.submit(submitit.helpers.CommandFunction(req.command, cwd=str(root)))
        record.jobs[req.job] = {"id": str(job.job_id), "state": "RUNNING",
                                "log": str(job.paths.stderr)}
        record.save(root)
        echo(f"running {req.job} (local job {job.job_id})")
        try:
            job.result()
            record.jobs[req.job]["state"] = "COMPLETED"
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C or SIGTERM of rlspec: stop the job's processes too (submitit's local
            # controller forwards the interrupt, then kills), never leave it running unseen.
            _stop_local(job)
            record.jobs[req.job]["state"] = "INTERRUPTED"
            record.save(root)
            echo(f"{req.job}: INTERRUPTED (run the same command again to resume)")
            raise
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as exc:
            record.jobs[req.job]["state"] = "FAILED"
            record.jobs[req.job]["reason"] = _last_line(job.stderr() or "") or str(exc)[:500]
        record.save(root)
        echo(f"{req.job}: {record.jobs[req.job]['state']}")
    return record


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at ``path`` while a child is spawned: submitit's local
    controller inherits it, so its own messages (a Ctrl-C traceback) go to a log, not to
    the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _stop_local(job: Any, timeout_s: float = 30.0) -> None:
    """Stop a submitit local job and every process it started: SIGTERM to the whole tree
    (the launch script's EXIT trap stops its roles; submitit's own job wrapper ignores
    SIGTERM, which is why the tree is signalled, not only the controller), then SIGKILL to
    whatever is left after ``timeout_s``. A local job's id is its controller's process id."""
    if not (str(job.job_id).isdigit() and stop_tree(int(job.job_id), timeout_s)):
        job.cancel(check=False)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


# Slurm states of a job that ran and did not succeed (the job's log says why), and the
# states from which a job never runs again.
FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
ENDED = ("COMPLETED", "CANCELLED", "PREEMPTED", *FAILED_STATES)


def _need(command: str) -> None:
    if shutil.which(command) is None:
        raise BundleInputError(f"`{command}` is not available here: run this on a Slurm login node")


def _query(command: list[str], *, gone_ok: bool = True) -> tuple[str, str | None]:
    """Run a Slurm command: (its stdout, what went wrong or None). With ``gone_ok``, Slurm's
    "Invalid job id" (squeue -j of jobs that left the queue) is not a failure."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        return "", f"`{command[0]}` could not run ({exc.strerror})"
    if done.returncode != 0 and not (gone_ok and "Invalid job id" in done.stderr):
        return done.stdout, (f"`{command[0]}` failed (exit {done.returncode}): "
                             f"{_last_line(done.stderr) or 'no message'}")
    return done.stdout, None


def slurm_states(ids: list[str]) -> tuple[dict[str, str], list[str]]:
    """Current Slurm state of job ids (squeue for live jobs, sacct for finished ones), and
    what went wrong asking (a job missing from the states is not known now)."""
    states: dict[str, str] = {}
    problems: list[str] = []
    if not ids:
        return states, problems
    _need("squeue")
    out, problem = _query(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)])
    problems += [problem] if problem else []
    for line in out.splitlines():
        if len(line.split()) >= 2:
            job_id, state = line.split()[:2]
            states[job_id] = state
    rest = [i for i in ids if i not in states]
    if rest and shutil.which("sacct"):
        out, problem = _query(["sacct", "-n", "-X", "-P", "-o", "JobID,State",
                               "-j", ",".join(rest)])
        problems += [problem] if problem else []
        for line in out.splitlines():
            job_id, _, state = line.partition("|")
            states[job_id] = state.split()[0] if state.strip() else "UNKNOWN"
    elif rest and not problems:
        problems.append("`sacct` is not available here (it reports the jobs that left the "
                        "queue)")
    return states, problems


class CancelFailed(BundleError):
    """scancel failed for some jobs (exit code 1): they were not recorded as cancelled."""


def cancel(bundle: str | Path) -> list[str]:
    """scancel every recorded Slurm job of the bundle; returns the ids cancelled. When
    scancel fails, the jobs Slurm does not show as ended keep their recorded state and
    `CancelFailed` names them."""
    root = Path(bundle).resolve()
    read_manifest(bundle)  # a mistyped path or another folder says so
    record = Submission.load(root)
    if record is None:
        raise BundleInputError(f"{root} has not been submitted")
    if record.backend != "slurm":
        raise BundleInputError("local runs execute in the foreground; stop them with Ctrl-C")
    _need("scancel")
    # Jobs that already ended keep their real state (and are not counted as cancelled).
    live, _ = slurm_states([j["id"] for j in record.jobs.values() if j.get("id")])
    to_cancel = {}
    for name, job in record.jobs.items():
        state = live.get(job.get("id") or "", job["state"])
        if state in ENDED:
            job["state"] = state
        elif job.get("id"):
            to_cancel[name] = job
        else:
            job["state"] = "CANCELLED"  # never reached Slurm
    failure = None
    if to_cancel:
        _, failure = _query(["scancel", *(j["id"] for j in to_cancel.values())], gone_ok=False)
    if failure:
        # What did end (scancel may have cancelled some) is recorded; the rest is not.
        after, _ = slurm_states([j["id"] for j in to_cancel.values()])
        for job in to_cancel.values():
            if after.get(job["id"]) in ENDED:
                job["state"] = after[job["id"]]
        left = {n: j for n, j in to_cancel.items() if j["state"] not in ENDED}
        done = [f"{n} ({j['state']})" for n, j in to_cancel.items() if n not in left]
    else:
        for job in to_cancel.values():
            job["state"] = "CANCELLED"
        left, done = {}, []
    record.save(root)
    if left:
        raise CancelFailed(
            f"{failure}; not cancelled: " + ", ".join(f"{n} (Slurm job {j['id']})"
                                                     for n, j in left.items())
            + (f" (ended: {', '.join(done)})" if done else "")
            + f"; they keep their recorded state; run `rlspec cancel {bundle}` again once "
            "scancel works here (or scancel those ids yourself)")
    return [j["id"] for j in to_cancel.values() if j["state"] == "CANCELLED"]

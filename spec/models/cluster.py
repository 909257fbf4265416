"""The `cluster` section: scheduler, devices, Slurm resources, container and environment."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from spec.errors import Refusal
from spec.models.base import PosFloat, PosInt, Section, no_secret
from spec.secrets import credential, secret_word

# \Z, not $: "$" also matches before a trailing newline, which would reach a script.
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}\Z")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# Slurm names (partition, account, qos) are written into #SBATCH lines: one plain word.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\Z")
# cluster.env is written into env.sh, jobs/*/config.json and spec.resolved.yaml.
_WRITTEN = "cluster.env is written into the bundle (env.sh, jobs/*/config.json, spec.resolved.yaml)"


def _env_name(name: str) -> str:
    """A cluster.env name: a shell name that does not say it holds a secret (`spec.secrets`)."""
    if not _ENV_NAME.match(name):
        raise ValueError(f"environment variable name {name!r} is not a valid shell name")
    if credential(name) is not None:
        raise Refusal(f"this name looks like {credential(name)}, not a variable's name; "
                      f"{_WRITTEN}", "remove it")
    if (word := secret_word(name)) is not None:
        raise Refusal(f"{name} looks like a secret (its name has '{word}'); {_WRITTEN}",
                      f"remove {name} from cluster.env and list it in cluster.env_passthrough: "
                      "its value is then taken from the environment when a job starts, and "
                      "never written")
    return name


def _env_value(value: str) -> str:
    return no_secret(value, "remove the variable from cluster.env; export it in the "
                     "environment that submits the run and list its name in "
                     "cluster.env_passthrough (its value is then never written)")


EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str, AfterValidator(_env_value)]


class Container(Section):
    """Container the jobs run in (pyxis/enroot `srun --container-image`)."""

    image: str = Field(description="Image reference or squashfs path.")
    mounts: list[str] = Field(default_factory=list, description="`src:dst` bind mounts.")


class Cluster(Section):
    """Where the jobs run. `local` runs the same jobs, in the same order, on this machine."""

    scheduler: Literal["slurm", "local"] = Field("local", description="Job scheduler.")
    devices: Literal["gpu", "cpu"] = Field(
        "gpu", description="What a rank runs on; cpu is for the embedded tiny run and tests."
    )
    partition: str | None = Field(None, description="Slurm partition (`--partition`).")
    account: str | None = Field(None, description="Slurm account (`--account`).")
    qos: str | None = Field(None, description="Slurm QOS (`--qos`).")
    gpus_per_node: PosInt = Field(
        8, le=256, description="GPUs per node; with devices=cpu, worker processes per node."
    )
    gpu_memory_gb: PosFloat = Field(80.0, le=100_000,
                                    description="Memory of one GPU, in GB (10^9 bytes).")
    cpus_per_task: PosInt = Field(
        8,
        description="CPU cores per rank (per GPU; with devices=cpu, per worker process). A job "
        "starts one Slurm task per node, which runs that node's ranks, so it asks for "
        "`--cpus-per-task` = cpus_per_task × its ranks per node (× 1 for a job without GPUs), "
        "on sbatch and on every srun step. Slurm only (setting it on a local spec is warned).",
    )
    exclusive: bool = Field(
        True,
        description="Jobs with GPUs get whole nodes (`--exclusive`): no other job shares their "
        "CPUs, memory or network. Slurm only (setting it on a local spec is warned).",
    )
    mem_gb: PosInt | None = Field(
        None,
        description="Memory per node, in Slurm's GB (1024^3 bytes): `--mem=<N>G` for every job. "
        "None: all of the node's memory for the jobs with GPUs (`--mem=0`), the partition's "
        "default for the jobs without. Slurm only (setting it on a local spec is warned).",
    )
    time_limit: str = Field("24:00:00", description="Wall-clock limit per job, [D-]HH:MM:SS.")
    max_requeues: int = Field(
        3, ge=0, le=100,
        description="How many times a Slurm job that nears its `time_limit` requeues itself "
        "(`scontrol requeue`, 90 s before the limit) to go on where it stopped: the RL job from "
        "its last checkpoint, screen and eval from their saved batches. 0: it ends as TIMEOUT. "
        "Slurm only (setting it on a local spec is warned).")
    container: Container | None = Field(None, description="Container image for every job.")
    modules: list[str] = Field(default_factory=list, description="Environment modules to load on "
                               "the nodes (not inside `container`: an image has no module system).")
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict,
        description="Non-secret environment variables written into the launch scripts (and "
        "the bundle's other files). A name that says it holds a secret (a word such as TOKEN, "
        "KEY, PASS, PAT, SECRET, AUTH, PRIVATE, COOKIE, SESSION between its '_') and a value "
        "that looks like a credential (a token or key of a known issuer, a PEM private key, "
        "a URL with a password) are refused: list such a variable in env_passthrough.",
    )
    env_passthrough: list[str] = Field(
        default_factory=list,
        description="Names of variables taken from the submitting environment at submit "
        "time (tokens, keys): their values are never written into the bundle.",
    )
    output_dir: str = Field(
        "runs", description="Directory under which each run writes checkpoints, logs, metrics."
    )

    @field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_name(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_NAME.match(v):
            raise ValueError(
                f"{v!r} is not a Slurm name (letters, digits, '_', '.', '+', '-'); it is "
                "written into #SBATCH lines"
            )
        return v

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _TIME.match(v):
            raise ValueError(f"time_limit {v!r} is not [D-]HH:MM:SS, e.g. '2-00:00:00' or '04:00:00'")
        return v

    @field_validator("env_passthrough")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not a valid shell name")
        return v

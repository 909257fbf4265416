"""Generate docs/checks.md: every compiler check and every start-up refusal, from the code.

`python -m compiler.docs` prints it (`make docs` writes docs/checks.md); a test fails when the
committed file is stale, when a rule of `compiler.checks.RULES` or `runtime.capabilities`
has no entry here, and when an example stops triggering its rule. Each entry is the rule's
docstring (what it checks) and, for each example, the command that triggers it and the
messages `rlspec validate` prints for that rule: the real ones, computed here, so a changed
message or hint changes the document.

Examples are overrides (`--set`) of the specs in examples/, so a reader can run them. Only
the problems of the rule being described are shown (the same command may print others).
File lines are left out of the messages so that editing an example does not make the
document stale.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = "examples/tiny/spec.yaml"
SINGLE = "examples/qwen3-30b-a3b.yaml"
BIG = "examples/compassmax-245b.yaml"


@dataclass(frozen=True)
class Example:
    """`rlspec validate SPEC --set ...` that triggers a rule (SPEC relative to the repository)."""

    spec: str
    overrides: tuple[str, ...] = ()

    def command(self) -> str:
        sets = "".join(f" --set {o}" for o in self.overrides)
        return f"rlspec validate {self.spec}{sets}"


def _ex(spec: str, *overrides: str) -> Example:
    return Example(spec, overrides)


# Compiler checks (compiler.checks.RULES), by rule function name.
CHECK_EXAMPLES: dict[str, tuple[Example, ...]] = {
    "training_grid": (_ex(BIG, "train.nodes=15"),),
    "expert_grid": (
        _ex(BIG, "train.parallelism.expert_tensor=null"),
        _ex(SINGLE, "train.parallelism.tensor=2", "train.parallelism.expert=4",
            "train.parallelism.expert_tensor=null"),
    ),
    "expert_sizes": (_ex(BIG, "model.architecture.moe.num_experts=12"),),
    "attention_tp": (_ex(SINGLE, "train.parallelism.tensor=8"),),
    "checkpoint_head_dim": (_ex(SINGLE, "model.architecture.head_dim=null"),),
    "pipeline": (
        _ex(BIG, "model.architecture.num_layers=62"),
        _ex(BIG, "train.parallelism.last_pipeline_stage_layers=5"),
    ),
    "sequence_parallel": (
        _ex(SINGLE, "train.parallelism.sequence_parallel=false"),
        _ex(SINGLE, "rollout.max_tokens=8190"),
    ),
    "context_parallel": (_ex(SINGLE, "train.parallelism.context=2", "rollout.max_tokens=8190"),),
    "batch_arithmetic": (_ex(SINGLE, "train.micro_batch_size=3"),),
    "interleaved_schedule": (
        _ex(BIG, "train.parallelism.virtual_pipeline=2", "train.global_batch_size=16"),
    ),
    "rollout_grid": (
        _ex(SINGLE, "rollout.parallelism.data=3"),
        _ex(SINGLE, "rollout.parallelism.tensor=3", "rollout.parallelism.data=1"),
    ),
    "redundant_experts": (_ex(TINY, "rollout.redundant_experts=8"),),
    "fp8_rollout": (
        _ex(TINY, "rollout.fp8=true", "algorithm.correction.mode=none"),
        _ex(TINY, "rollout.fp8=true"),
        _ex(SINGLE, "rollout.fp8=true", "router_replay.mode=off"),
    ),
    "stale_rollouts": (
        _ex(TINY, "system.max_staleness=1", "algorithm.correction.mode=none"),
    ),
    "colocated_placement": (
        _ex(SINGLE, "rollout.placement=colocated"),
        _ex(SINGLE, "rollout.placement=colocated", "rollout.nodes=2",
            "rollout.gpu_memory_utilization=0.32"),
    ),
    "run_level": (
        _ex(SINGLE, "rollout.prompts_per_step=60"),
        _ex(SINGLE, "rollout.max_tokens=40000"),
        _ex(SINGLE, "rollout.n=1", "rollout.prompts_per_step=512"),
        _ex(TINY, "train.optimizer.warmup_steps=5000"),
    ),
    "cluster_settings": (
        _ex(SINGLE, "cluster.partition=null"),
        _ex(SINGLE, "system.weight_sync=ipc"),
        _ex(SINGLE, "system.reward_workers=100"),
    ),
    "zve_budgets": (
        _ex(SINGLE, "filters[1].fallback=null"),
        _ex(TINY, "filters[2].length.coefficient=0"),
        _ex(TINY, "filters[1].max_n=8"),
    ),
    "references": (
        _ex(SINGLE, "algorithm.advantage.estimator=rl_zvp"),
        _ex(BIG, "cluster.env_passthrough=[HF_TOKEN]"),
        _ex(SINGLE, "algorithm.gspo.clip_high=0.001"),
    ),
    "unused_settings": (
        _ex(TINY, "rollout.max_num_seqs=64"),
        _ex(TINY, "cluster.partition=gpu"),
    ),
    "memory": (
        _ex(BIG, "cluster.gpu_memory_gb=40"),
        _ex(SINGLE, "rollout.gpu_memory_utilization=0.1"),
    ),
}

# Start-up refusals (runtime.capabilities.RULES and FLAG_RULES), by rule name.
REFUSAL_EXAMPLES: dict[str, tuple[Example, ...]] = {
    "embedded_model": (_ex(TINY, "model.architecture.moe.score_function=sigmoid"),),
    "megatron_model": (_ex(SINGLE, "model.architecture.moe.shared_experts=1"),),
    "dense_replay": (
        _ex(SINGLE, "model.architecture.family=qwen3", "model.architecture.moe=null",
            "train.parallelism.expert=1", "train.parallelism.expert_tensor=null",
            "rollout.parallelism.expert_parallel=false"),
    ),
    "aux_loss": (_ex(SINGLE, "model.architecture.moe.aux_loss_coeff=0.001"),),
    "weight_sync": (_ex(SINGLE, "system.weight_sync=nccl"),
                    _ex(TINY, "system.weight_sync=nccl", "rollout.engine=vllm"),
                    _ex(SINGLE, "system.weight_sync=ipc", "rollout.placement=colocated", "rollout.nodes=2",
                        "rollout.gpu_memory_utilization=0.3"),
                    _ex(TINY, "system.weight_sync=ipc", "rollout.engine=vllm"),
                    _ex(TINY, "system.weight_sync=ipc", "cluster.scheduler=slurm",
                        "cluster.partition=cpu", "rollout.placement=colocated",
                        "train.backend=megatron", "cluster.gpus_per_node=2",
                        "train.parallelism.expert=2",
                        "model.architecture.moe.token_dispatcher=allgather", "train.nodes=2",
                        "rollout.nodes=2")),
    "placement": (_ex(TINY, "rollout.placement=colocated", "system.max_staleness=1",
                      "algorithm.correction.mode=tis"),
                  _ex(TINY, "rollout.placement=colocated", "rollout.engine=vllm")),
    "container": (_ex(TINY, "cluster.container.image=/images/rlspec.sqsh"),),
    "precision": (_ex(TINY, "train.precision=bf16"),),
    "devices": (_ex(TINY, "cluster.devices=gpu"),),
    "megatron_cpu": (_ex(TINY, "train.backend=megatron"),),
    "recompute": (_ex(TINY, "train.recompute=full"),),
    "tokenizer": (_ex(SINGLE, "model.tokenizer=/models/another-tokenizer"),),
    "local_nodes": (_ex(TINY, "train.backend=megatron", "model.architecture.moe.token_dispatcher=allgather",
                        "train.nodes=2"),),
    "embedded_trainer_nodes": (_ex(TINY, "train.nodes=2"),),
    "screen_nodes": (_ex(TINY, "filters[0].nodes=2"),),
    "optimizer_offload": (_ex(TINY, "train.optimizer.cpu_offload=true"),),
    "vllm_cpu": (_ex(TINY, "rollout.engine=vllm", "model.architecture.head_dim=16"),),
    # Reached by an edited train.sh only: validate refuses the same settings in the spec.
    "megatron_layout": (),
}

# The preflight's own checks beside the capability rules (runtime.preflight), by rule name:
# the function that makes them, a note for the reader, and examples where one can be given
# without files.
PREFLIGHT_CHECKS: dict[str, tuple[str, str, tuple[Example, ...]]] = {
    "train_flags": (
        "_train_flags",
        "The `rl` job of a Megatron trainer parses the flags of `jobs/rl/train.sh` with the "
        "trainer's own parser (`runtime/megatron/args.py`) and refuses a flag it rejects or a "
        "layout of `megatron_layout`. A compiled bundle always parses; this catches a "
        "`train.sh` edited by hand (`rlspec check DIR`, which also checks an edited layout "
        "as the spec's keys set to its flags: `compiler/edited.py`). Way out: recompile the "
        "bundle, or correct the flag.",
        (),
    ),
    "checkpoint": (
        "_checkpoints",
        "Where the `config.json` of `model.checkpoint` (an HF checkpoint) is readable from "
        "where `validate` runs, every field of `model.architecture` is compared with it "
        "(`num_layers` with `num_hidden_layers`, `moe.num_experts` with `num_experts`, ...). "
        "Each difference is an error naming both values, and the hint sets the checkpoint's "
        "value, e.g. `set model.architecture.num_layers: 40`. A checkpoint on a mount the "
        "login node does not see is compared when the job starts.",
        (),
    ),
    "one_gpu_memory": ("_one_gpu_memory", "", (_ex(BIG, "rollout.engine=local"),)),
}

_HEADER = """\
# Checks and refusals

<!-- Generated from compiler/checks/, runtime/capabilities/ and runtime/preflight.py by
`make docs` (python -m compiler.docs). Do not edit by hand. -->

`rlspec validate` (and `compile`, `inspect`, `run`) checks a spec in three layers and reports
every problem of the file at once, each with its file and line (or the `--set` it came from),
its dotted path, the numbers involved and a hint that fixes it. Exit code 2 means the spec
is invalid.

1. **Shape**: types, bounds, unknown keys (with a did-you-mean), the stage order of
   `filters`. The keys and their bounds are in [spec.md](spec.md).
2. **Compiler checks** (`compiler/checks/`): the sizes of different sections against each
   other, computed on the plan (world sizes, grids, batches, memory). An *error* means the
   run cannot start, or would silently do something other than what is written; a
   *warning* is legal but probably not meant (shown by `validate` and `inspect`).
3. **Start-up refusals** (`runtime/capabilities/`, `runtime/preflight.py`): what a job of
   the bundle checks when it starts, before it loads weights: what its trainer, rollout
   engine, scheduler and devices support. `validate` and `compile` run every job's
   preflight on the bundle they build, so a setting a job would refuse after hours in the
   queue is refused on the login node; `rlspec check DIR` runs them on a written bundle
   (after a flag of `jobs/rl/train.sh` was edited by hand, say). These are errors.

Each entry below gives the rule as the code states it, then a command that triggers it on
one of the [examples](../examples) and what `rlspec validate` prints for that rule (the same
command may print other problems too). The design behind the checks is in
[design.md](design.md).
"""


def _doc(obj: object) -> str:
    """An object's docstring as one paragraph (reST double backticks made Markdown)."""
    text = " ".join((inspect.getdoc(obj) or "").split())
    return text.replace("``", "`")


def _summary(text: str) -> str:
    """The first sentence of a docstring paragraph (a period followed by a space or the end)."""
    for i, ch in enumerate(text):
        if ch == "." and (i + 1 == len(text) or text[i + 1] == " ") and not text[:i].endswith(
                ("e.g", "i.e", "vs", "etc")):
            return text[: i + 1]
    return text


def _location(problem, source, example: Example):
    """The problem as `validate` prints it, with the example's file name and no line."""
    from spec.errors import Problem

    p: Problem = source.locate(problem)
    file = example.spec if p.file == str(ROOT / example.spec) else p.file
    return replace(p, file=file, line=None)


def check_messages(rule_name: str, example: Example) -> list[str]:
    """What compiler check ``rule_name`` reports on ``example``, as `validate` prints it: its
    warnings only where the spec has no error, since an invalid spec's report lists its
    errors alone (`spec.errors.SpecError`)."""
    from compiler.checks import RULES
    from compiler.plan import make_plan
    from spec.loader import load_spec

    rule = {r.__name__: r for r in RULES}[rule_name]
    source = load_spec(ROOT / example.spec, example.overrides)
    plan = make_plan(source.spec)
    problems = list(rule(source.spec, plan))
    if any(p.severity == "warning" for p in problems) and not _validates(example):
        problems = [p for p in problems if p.severity == "error"]
    return [_location(p, source, example).format() for p in problems]


def _validates(example: Example) -> bool:
    """Whether `rlspec validate` accepts the example (and so prints its warnings)."""
    from compiler.api import validate
    from spec.errors import SpecError

    try:
        validate(ROOT / example.spec, example.overrides)
    except SpecError:
        return False
    return True


def refusal_messages(rule_name: str, example: Example) -> list[str]:
    """What the preflight of the example's bundle refuses under rule ``rule_name``."""
    from compiler.api import compile_spec, refusal_problems
    from runtime.preflight import preflight_bundle

    path = ROOT / example.spec
    compiled = compile_spec(path, example.overrides, preflight=False)
    refusals = [r for r in preflight_bundle(compiled.files, base=path.parent)
                if r.rule == rule_name]
    source = compiled.validated.source
    return [_location(p, source, example).format() for p in refusal_problems(refusals)]


def _entry(out: list[str], name: str, doc: str, examples: Sequence[Example],
           messages: Callable[[str, Example], list[str]], extra: Iterable[str] = ()) -> None:
    out += ["", f"### `{name}`", "", doc, *extra]
    for ex in examples:
        found = messages(name, ex)
        if not found:
            raise AssertionError(f"{name}: {ex.command()} does not trigger the rule")
        out += ["", "```", f"$ {ex.command()}", *found, "```"]


def _table(out: list[str], head: str, rows: Iterable[tuple[str, str]]) -> None:
    out += ["", f"| {head} | what it checks |", "|---|---|"]
    out += [f"| [`{n}`](#{n}) | {_cell(s)} |" for n, s in rows]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_checks() -> str:
    """docs/checks.md: the header, the compiler checks, the start-up refusals."""
    from compiler import checks
    from runtime import capabilities, preflight

    names = [r.__name__ for r in checks.RULES]
    missing = sorted(set(names) ^ set(CHECK_EXAMPLES))
    if missing:
        raise AssertionError(f"compiler checks without an entry in compiler/docs.py (or "
                             f"entries of no rule): {missing}")
    refusals = {**capabilities.RULES, **capabilities.FLAG_RULES}
    missing = sorted(set(refusals) ^ set(REFUSAL_EXAMPLES))
    if missing:
        raise AssertionError(f"capability rules without an entry in compiler/docs.py (or "
                             f"entries of no rule): {missing}")

    out = [_HEADER.rstrip("\n"), "", "## Compiler checks", "",
           "In the order they run, which is the order one fixes them in: "
           + ", ".join(f"`{n}`" for n in names) + "."]
    _table(out, "check", ((r.__name__, _summary(_doc(r))) for r in checks.RULES))
    for rule in checks.RULES:
        _entry(out, rule.__name__, _doc(rule), CHECK_EXAMPLES[rule.__name__], check_messages)

    jobs_of: dict[str, list[str]] = {}
    for entry, rules in capabilities.JOB_RULES.items():
        for rule_name in rules:
            jobs_of.setdefault(rule_name, []).append(entry)
    out += ["", "## Start-up refusals", "",
            "What the runtime cannot run yet, declared once in `runtime/capabilities/`: each "
            "job runs the rules of its entry point when it starts, and `validate` runs them "
            "all first. A refusal names the jobs that would refuse to start. The table of what "
            "runs on which path is in the [README](../README.md#what-runs-today)."]
    _table(out, "rule", [(n, _summary(_doc(f))) for n, f in refusals.items()]
           + [(n, _summary(_doc(getattr(preflight, f)))) for n, (f, _, _) in PREFLIGHT_CHECKS.items()])
    for name, fn in refusals.items():
        if name in capabilities.FLAG_RULES:
            where = ["", "Run by: the `rl` job (Megatron trainer), on the flags of "
                         "`jobs/rl/train.sh`, and by `rlspec check DIR`: a compiled bundle "
                         "never holds these flags (validate refuses the settings that would "
                         "render them), a `train.sh` edited by hand may."]
        else:
            where = ["", "Run at start by the job entry points " + ", ".join(f"`{j}`" for j in jobs_of[name])
                     + (" (and `rl` when its trainer or engine is the embedded one)"
                        if name == "embedded_model" else "") + "."]
        _entry(out, name, _doc(fn), REFUSAL_EXAMPLES[name], refusal_messages, where)
    for name, (fn, note, examples) in PREFLIGHT_CHECKS.items():
        _entry(out, name, _doc(getattr(preflight, fn)), examples, refusal_messages,
               ["", note] if note else [])
    return "\n".join(out) + "\n"


def main() -> None:
    print(render_checks(), end="")


if __name__ == "__main__":
    main()

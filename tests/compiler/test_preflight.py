"""What validates, runs: every runtime refusal is a validate error, with the job's own words.

For each rule of ``runtime.capabilities`` (and the Megatron trainer's flag rule, and the
checkpoint comparison), a spec that triggers it is refused by ``rlspec validate`` (exit 2,
the YAML path, the hint), and the job itself, started on the same bundle written without
the preflight, refuses at start with the same message before it does any work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from compiler.api import compile_spec
from compiler.bundle import write_bundle
from runtime import capabilities
from runtime.jobs.common import run_job
from spec.errors import SpecError
from tests.compiler.conftest import EXAMPLES
from tests.compiler.test_cli import cli

TINY = EXAMPLES / "tiny" / "spec.yaml"
SINGLE = EXAMPLES / "qwen3-30b-a3b.yaml"
# SINGLE's engines on its trainer's 2 nodes, leaving the trainer room on each GPU
COLOCATED_GPU = ["rollout.placement=colocated", "rollout.nodes=2",
                 "rollout.gpu_memory_utilization=0.3"]
ROOM = "cluster.gpu_memory_gb=100000"  # memory is not what these cases are about
CPU_MEGATRON = ["train.backend=megatron", "cluster.gpus_per_node=2", "train.parallelism.expert=2",
                "model.architecture.moe.token_dispatcher=allgather"]

# The tiny example as a DeepSeek-V3-style model: MLA, a sigmoid router, one leading dense layer,
# a shared expert (the embedded trainer refuses the selection bias: it keeps it fixed).
DEEPSEEK = ["model.architecture.family=deepseek_v3", "model.architecture.attention=mla",
            "model.architecture.num_query_groups=null",
            "model.architecture.mla={kv_lora_rank: 32, qk_head_dim: 32, qk_pos_emb_head_dim: 32, "
            "v_head_dim: 32}",
            "model.architecture.moe.score_function=sigmoid",
            "model.architecture.moe.first_dense_layers=1",
            "model.architecture.moe.shared_experts=1",
            "model.architecture.moe.routed_scaling_factor=2.5"]

# The tiny example as a GLM-4.5-style model: qkv bias and half-rotary RoPE (the family's),
# DeepSeek-V3's sigmoid MoE with a leading dense layer and a shared expert.
GLM = ["model.architecture.family=glm4_moe", "model.architecture.moe.score_function=sigmoid",
       "model.architecture.moe.first_dense_layers=1", "model.architecture.moe.shared_experts=1",
       "model.architecture.moe.routed_scaling_factor=2.5"]
# The tiny example without its MoE section (dense qwen3; router replay stays r3)
DENSE = ["model.architecture.family=qwen3", "model.architecture.moe=null"]

# rule, base spec, --set edits, the spec path refused, a job that refuses it, its message
CASES = [
    ("embedded_model", TINY, ["model.architecture.partial_rotary_factor=0.5"],
     ("model", "architecture", "partial_rotary_factor"), "init",
     "qwen3_moe rotates every dimension of each head"),
    ("embedded_model", TINY, ["model.architecture.qk_norm=false"],
     ("model", "architecture", "qk_norm"), "init",
     "qwen3_moe always normalises queries and keys per head"),
    ("embedded_model", TINY, [*GLM, "model.architecture.moe.expert_bias=true"],
     ("model", "architecture", "moe", "expert_bias"), "rl",
     "the Megatron trainer applies GLM-4.5's"),
    ("embedded_model", TINY, [*DEEPSEEK, "model.architecture.moe.expert_bias=true"],
     ("model", "architecture", "moe", "expert_bias"), "rl",
     "embedded trainer keeps the expert-selection bias fixed"),
    ("megatron_model", SINGLE, ["model.architecture.moe.score_function=sigmoid"],
     ("model", "architecture", "moe", "score_function"), "convert",
     "the Megatron trainer has no sigmoid router for it"),
    ("megatron_model", TINY, [*DEEPSEEK, *CPU_MEGATRON, "model.architecture.moe.norm_topk_prob=false"],
     ("model", "architecture", "moe", "norm_topk_prob"), "rl",
     "always renormalises a sigmoid router's top-k gates"),
    ("megatron_model", TINY, [*CPU_MEGATRON, "model.architecture.rope_theta=10000.5"],
     ("model", "architecture", "rope_theta"), "rl", "--rotary-base is an integer"),
    ("megatron_model", TINY, [*GLM, *CPU_MEGATRON, "model.architecture.moe.score_function=softmax"],
     ("model", "architecture", "moe", "score_function"), "rl",
     "GLM-4.5 routes with sigmoid; the Megatron trainer has no softmax router"),
    ("dense_replay", TINY, [*DENSE, "model.architecture.family=llama"],
     ("router_replay", "mode"), "rl", "router replay r3 on a dense model (family llama"),
    ("aux_loss", SINGLE, ["model.architecture.moe.aux_loss_coeff=0.001"],
     ("model", "architecture", "moe", "aux_loss_coeff"), "rl", "auxiliary loss"),
    ("weight_sync", SINGLE, ["system.weight_sync=nccl"],
     ("system", "weight_sync"), "rl", "does not join the engines' NCCL group"),
    ("weight_sync", TINY, ["system.weight_sync=nccl", "rollout.engine=vllm"],
     ("system", "weight_sync"), "rl", "vLLM's NCCL backend needs CUDA"),
    ("weight_sync", SINGLE, ["system.weight_sync=ipc", *COLOCATED_GPU],
     ("system", "weight_sync"), "rl", "CUDA IPC into the engines' GPUs is not built"),
    ("weight_sync", TINY, ["system.weight_sync=ipc", "rollout.engine=vllm"],
     ("system", "weight_sync"), "rl", "vLLM's IPC backend maps CUDA memory"),
    ("weight_sync", TINY, ["system.weight_sync=ipc", "cluster.scheduler=slurm",
                           "cluster.partition=cpu", "rollout.placement=colocated",
                           *CPU_MEGATRON, "train.nodes=2", "rollout.nodes=2"],
     ("system", "weight_sync"), "rl", "the engines of the other nodes"),
    ("placement", TINY, ["rollout.placement=colocated", "system.max_staleness=1",
                         "algorithm.correction.mode=tis"],
     ("system", "max_staleness"), "rl", "cannot generate the 1 step(s) ahead"),
    ("placement", TINY, ["rollout.placement=colocated", "rollout.engine=vllm"],
     ("rollout", "placement"), "rl", "vLLM's CPU build refuses it"),
    ("container", TINY, ["cluster.container={image: img.sqsh}"],
     ("cluster", "container"), "sft", "starts no container"),
    ("precision", TINY, ["train.precision=bf16"],
     ("train", "precision"), "rl", "embedded trainer computes in fp32"),
    ("precision", TINY, [*CPU_MEGATRON, "train.precision=bf16"],
     ("train", "precision"), "rl", "Megatron trainer on cluster.devices cpu computes in fp32"),
    ("devices", TINY, ["cluster.devices=gpu"],
     ("train", "backend"), "rl", "embedded trainer runs on the CPU only"),
    ("devices", TINY, ["cluster.devices=gpu"],
     ("rollout", "engine"), "rl", "embedded rollout server runs on the CPU only"),
    ("megatron_cpu", TINY, [*CPU_MEGATRON, "model.architecture.moe.token_dispatcher=alltoall"],
     ("model", "architecture", "moe", "token_dispatcher"), "rl", "runs the allgather dispatcher"),
    ("recompute", TINY, ["train.recompute=selective"],
     ("train", "recompute"), "rl", "embedded trainer does not recompute"),
    ("one_gpu_memory", EXAMPLES / "compassmax-245b.yaml", ["rollout.engine=local"],
     ("eval", "enabled"), "eval_before", "the embedded engine serves the whole 244.9 B-parameter"),
    ("tokenizer", SINGLE, ["model.tokenizer=/models/other-tokenizer"],
     ("model", "tokenizer"), "rl", "tokenizer saved with the HF checkpoint"),
    ("local_nodes", TINY, [*CPU_MEGATRON, "train.nodes=2"],
     ("train", "nodes"), "rl", "the local scheduler runs the trainer once"),
    ("local_nodes", TINY, ["rollout.nodes=2"],
     ("rollout", "nodes"), "rl", "the local scheduler runs the rollout engines once"),
    ("embedded_trainer_nodes", TINY, ["train.nodes=2"],
     ("train", "nodes"), "rl", "every trainer node would start its own copy"),
    ("optimizer_offload", TINY, ["train.optimizer.cpu_offload=true"],
     ("train", "optimizer", "cpu_offload"), "rl", "the embedded trainer has no optimizer CPU offload"),
    ("optimizer_offload", TINY, [*CPU_MEGATRON, "train.optimizer.cpu_offload=true"],
     ("train", "optimizer", "cpu_offload"), "rl", "hybrid CPU optimizer needs CUDA"),
    ("vllm_cpu", TINY, ["rollout.engine=vllm", "model.architecture.head_dim=16"],
     ("model", "architecture", "head_dim"), "rl", "no kernel for head_dim 16"),
    ("vllm_cpu", TINY, ["rollout.engine=vllm", "model.architecture.moe.expert_ffn_hidden_size=48"],
     ("model", "architecture", "moe", "expert_ffn_hidden_size"), "rl", "cannot reload new weights"),
    ("vllm_cpu", TINY, ["rollout.engine=vllm", "rollout.parallelism.data=2", "rollout.nodes=2"],
     ("rollout", "parallelism", "data"), "rl", "cannot run one replica over several nodes"),
    ("screen_nodes", TINY, ["filters[0].nodes=2"],
     ("filters", 0, "nodes"), "screen", "would wait for shards no other node screens"),
]


def test_every_rule_has_a_case() -> None:
    covered = {case[0] for case in CASES}
    assert covered == set(capabilities.RULES) | {"one_gpu_memory"}
    # the rules on train.sh's flags alone: test_check_runs_every_preflight_on_a_written_bundle
    assert set(capabilities.FLAG_RULES) == {"megatron_layout"}


def _refused(base: Path, edits: list[str]) -> list:
    with pytest.raises(SpecError) as info:
        compile_spec(base, edits)
    return info.value.problems


def _job_refusal(base: Path, edits: list[str], job: str, tmp_path: Path,
                 capsys: pytest.CaptureFixture[str]) -> str:
    """What the job prints when started on the bundle (written without the preflight)."""
    bundle = write_bundle(compile_spec(base, edits, preflight=False).files, tmp_path / "bundle")
    ran = []
    code = run_job(ran.append, ["--config", str(bundle / "jobs" / job / "config.json")])
    assert code == 1 and not ran, "the job started its work"
    return capsys.readouterr().err


@pytest.mark.parametrize(("rule", "base", "edits", "path", "job", "words"), CASES,
                         ids=[f"{c[0]}-{c[3][-1]}" for c in CASES])
def test_validate_refuses_what_the_job_refuses(rule, base, edits, path, job, words, tmp_path,
                                               capsys, monkeypatch) -> None:
    monkeypatch.setenv("RLSPEC_RUN_DIR", str(tmp_path / "run"))
    problems = [p for p in _refused(base, edits) if p.path == path and words in p.message]
    assert len(problems) == 1, [p.format() for p in _refused(base, edits)]
    p = problems[0]
    assert job in p.message.split(" (job")[1] and p.suggestion
    assert p.line is not None or p.file == "--set"  # located: the YAML line or the --set
    message = p.message.split(" (job")[0]
    assert message in _job_refusal(base, edits, job, tmp_path, capsys)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("mode", ["r2", "r3"])
def test_router_replay_needs_an_moe_model(family: str, mode: str) -> None:
    """A dense model has no routers: r2 and r3 are refused (``rlspec validate`` exits 2), with
    the mode and the way out; off compiles."""
    dense = [*DENSE, f"model.architecture.family={family}"]
    sets = [arg for edit in [*dense, f"router_replay.mode={mode}"] for arg in ("--set", edit)]
    result = cli("validate", TINY, *sets)
    assert result.exit_code == 2, result.output
    assert (f"router_replay.mode: router replay {mode} on a dense model (family {family}"
            in result.stderr)
    assert "hint: set router_replay.mode: off, or give the model a moe section" in result.stderr
    assert compile_spec(TINY, [*dense, "router_replay.mode=off"]).refusals == ()


def test_the_examples_pass_every_preflight() -> None:
    for path in (TINY, SINGLE, EXAMPLES / "compassmax-245b.yaml"):
        assert compile_spec(path).refusals == ()


def test_a_tiny_deepseek_spec_passes_every_preflight() -> None:
    """DeepSeek-V3 / Moonlight (MLA, sigmoid router, shared expert, a leading dense layer, group
    limit) runs on the embedded trainer and engine, and on the Megatron trainer on CPU ranks
    with its selection bias."""
    groups = ["model.architecture.moe.num_groups=4", "model.architecture.moe.group_top_k=1"]
    assert compile_spec(TINY, [*DEEPSEEK, *groups]).refusals == ()
    compiled = compile_spec(TINY, [*DEEPSEEK, *groups, *CPU_MEGATRON,
                                   "model.architecture.moe.expert_bias=true"])
    assert compiled.refusals == ()
    train_sh = compiled.files["jobs/rl/train.sh"]
    for flag in ("--multi-latent-attention", "--moe-router-score-function sigmoid",
                 "--moe-router-enable-expert-bias", "--moe-shared-expert-intermediate-size 64",
                 "--moe-router-topk-scaling-factor 2.5", "--moe-router-num-groups 4",
                 "--moe-router-group-topk 1", "--moe-layer-freq"):
        assert flag in train_sh, flag


# Layouts the Megatron trainer runs (tests/megatron/test_mcore_trainer.py proves each equal to
# the embedded trainer on CPU): validate accepts them.
RUNS = {
    "expert_tensor-2": ["train.parallelism.expert=4", "train.parallelism.expert_tensor=2", ROOM],
    "expert_tensor-unset": ["train.parallelism.expert=2", "train.parallelism.expert_tensor=null",
                            ROOM],
    "tensor-without-expert": ["train.parallelism.expert=1", ROOM],
    "tensor-without-expert-etp-unset": ["train.parallelism.expert=1",
                                        "train.parallelism.expert_tensor=null", ROOM],
}
BIG = EXAMPLES / "compassmax-245b.yaml"  # PP 8 over 64 layers
RUNS_BIG = {
    "virtual_pipeline-2": ["train.parallelism.virtual_pipeline=2"],
    "uneven-stages": ["train.parallelism.first_pipeline_stage_layers=4",
                      "train.parallelism.last_pipeline_stage_layers=12"],
}


@pytest.mark.parametrize(("base", "edits"), [*((SINGLE, e) for e in RUNS.values()),
                                             *((BIG, e) for e in RUNS_BIG.values())],
                         ids=[*RUNS, *RUNS_BIG])
def test_validate_accepts_the_layouts_the_trainer_runs(base: Path, edits: list[str]) -> None:
    assert compile_spec(base, edits).refusals == ()


def test_a_checkpoint_that_differs_from_the_spec_is_refused(tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    spec = TINY.read_text(encoding="utf-8").replace("checkpoint: null", "checkpoint: ckpt")
    (tmp_path / "spec.yaml").write_text(spec, encoding="utf-8")
    (tmp_path / "ckpt").mkdir()
    config = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 96,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
              "rope_parameters": {"rope_theta": 1_000_000.0}}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    problems = _refused(tmp_path / "spec.yaml", [])
    assert [(p.path, p.suggestion) for p in problems] == [
        (("model", "architecture", "hidden_size"), "set model.architecture.hidden_size: 96")]
    assert "config.json" in problems[0].message and problems[0].line is not None
    monkeypatch.setenv("RLSPEC_RUN_DIR", str(tmp_path / "run"))
    bundle = write_bundle(compile_spec(tmp_path / "spec.yaml", preflight=False).files,
                          tmp_path / "bundle")
    assert run_job(lambda ctx: None, ["--config", str(bundle / "jobs" / "sft" / "config.json")]) == 1
    assert "hidden_size is 128 but the checkpoint" in capsys.readouterr().err
    config["hidden_size"] = 128  # the same shape: accepted
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert compile_spec(tmp_path / "spec.yaml").refusals == ()


def test_a_glm_checkpoint_decides_q_k_norms_and_partial_rope() -> None:
    """GLM-4.5 has per-head q/k norms, GLM-4.5-Air not, and both rotate half of each head:
    the spec's qk_norm (none: without) and partial_rotary_factor (none: 0.5) are compared with
    the checkpoint's use_qk_norm and partial_rotary_factor (top level or in rope_parameters)."""
    from runtime.preflight import checkpoint_mismatches
    from tests.families import tiny_glm_arch

    arch = tiny_glm_arch()
    glm45 = {"model_type": "glm4_moe", "use_qk_norm": True, "partial_rotary_factor": 0.5}
    (p,) = checkpoint_mismatches(arch, glm45, "ckpt/config.json")
    assert p.path == ("model", "architecture", "qk_norm")
    assert p.hint == "set model.architecture.qk_norm: true"
    assert checkpoint_mismatches({**arch, "qk_norm": True}, glm45, "c") == []
    air = {"model_type": "glm4_moe", "use_qk_norm": False,
           "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25}}
    (p,) = checkpoint_mismatches(arch, air, "c")
    assert p.path == ("model", "architecture", "partial_rotary_factor")
    assert "partial_rotary_factor is 0.5 but" in p.message


# Qwen/Qwen3-30B-A3B's config.json (the keys the comparison reads).
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
    "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "num_experts": 128,
    "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
}


@pytest.mark.parametrize("head_dim", ["128", None], ids=["head_dim-written", "head_dim-left-out"])
def test_validate_names_each_difference_from_a_readable_checkpoint(tmp_path: Path,
                                                                    head_dim) -> None:
    """model.checkpoint is a local HF folder: `validate` compares the architecture with its
    config.json and names each difference, also when the plan has an error of its own (with
    one, no bundle is built and no job preflight runs)."""
    (tmp_path / "Qwen3-30B-A3B").mkdir()
    (tmp_path / "Qwen3-30B-A3B" / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    text = SINGLE.read_text(encoding="utf-8")
    text = text.replace("checkpoint: /models/Qwen3-30B-A3B", "checkpoint: Qwen3-30B-A3B")
    text = text.replace("vocab_size: 151936", "vocab_size: 152064")
    text = text.replace("    num_layers: 48\n", "    num_layers: 40\n")
    if head_dim is None:
        text = text.replace("    head_dim: 128\n", "")
    else:  # and a plan error
        text = text.replace("  micro_batch_size: 1 ", "  micro_batch_size: 3 ")
    (tmp_path / "spec.yaml").write_text(text, encoding="utf-8")
    result = cli("validate", tmp_path / "spec.yaml")
    assert result.exit_code == 2, result.output
    named = re.findall(r"error: model\.architecture\.(\w+): (\w+) is (\S+) but the checkpoint's "
                       r"config\.json \(.*\) has (\w+) = (\S+)", result.stderr)
    differences = {(field, want, have) for field, _, want, _, have in named}
    expected = {("num_layers", "40", "48"), ("vocab_size", "152064", "151936")}
    if head_dim is None:
        expected.add(("head_dim", "64", "128"))
        # The readable config.json decides: not the rule for an unreadable checkpoint.
        assert "head_dim is not given" not in result.stderr
    else:
        assert "error: train.global_batch_size: global_batch_size 128" in result.stderr
    assert differences == expected, result.stderr


def test_a_quantized_checkpoint_is_refused_for_the_megatron_trainer(tmp_path: Path) -> None:
    """The Megatron trainer and its conversion read the policy's tensors as stored: an FP8
    checkpoint (quantization_config, as DeepSeek-V3 publishes) is refused at validate, naming
    the jobs that would fail."""
    (tmp_path / "Qwen3-30B-A3B").mkdir()
    fp8 = {**QWEN3_30B_A3B, "quantization_config": {"quant_method": "fp8",
                                                    "weight_block_size": [128, 128]}}
    (tmp_path / "Qwen3-30B-A3B" / "config.json").write_text(json.dumps(fp8))
    text = SINGLE.read_text(encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(
        text.replace("checkpoint: /models/Qwen3-30B-A3B", "checkpoint: Qwen3-30B-A3B"),
        encoding="utf-8")
    result = cli("validate", tmp_path / "spec.yaml")
    assert result.exit_code == 2, result.output
    assert re.search(r"error: model\.checkpoint: the checkpoint is fp8-quantized .*"
                     r"\(jobs convert, rl would refuse to start\)", result.stderr), result.stderr
    assert "dequantize it to bf16 first" in result.stderr
    del fp8["quantization_config"]
    (tmp_path / "Qwen3-30B-A3B" / "config.json").write_text(json.dumps(fp8))
    assert cli("validate", tmp_path / "spec.yaml").exit_code == 0


def test_check_runs_every_preflight_on_a_written_bundle(tmp_path: Path) -> None:
    bundle = write_bundle(compile_spec(SINGLE).files, tmp_path / "b")
    result = cli("check", str(bundle))
    assert result.exit_code == 0, result.output
    assert "every job's preflight passes" in result.stdout
    train_sh = bundle / "jobs" / "rl" / "train.sh"  # an operator edits a flag in place
    train_sh.write_text(train_sh.read_text().replace("--use-distributed-optimizer",
                                                     "--optimizer-cpu-offload"))
    result = cli("check", str(bundle))
    assert result.exit_code == 2
    assert ("train.optimizer.cpu_offload: --optimizer-cpu-offload runs inside the distributed "
            "optimizer" in result.stderr), result.stderr
    assert "spec.yaml:" in result.stderr and "hint: set train.optimizer.distributed" in result.stderr
    train_sh.write_text(train_sh.read_text().replace("--seq-length", "--seq-len"))
    result = cli("check", str(bundle))
    assert result.exit_code == 2 and "--seq-len" in result.stderr


def test_an_edited_layout_meets_the_checks_of_the_spec_that_would_render_it(
        tmp_path: Path) -> None:
    """The trainer runs train.sh's layout, not the spec's: an edited TP or EP is checked as
    the spec's key set to it (compiler.edited), each error naming the edited flag."""
    bundle = write_bundle(compile_spec(SINGLE).files, tmp_path / "b")
    train_sh = bundle / "jobs" / "rl" / "train.sh"
    rendered = train_sh.read_text()
    train_sh.write_text(rendered.replace("--tensor-model-parallel-size 4",
                                         "--tensor-model-parallel-size 3")
                        .replace("--expert-model-parallel-size 8", "--expert-model-parallel-size 5")
                        .replace("--seed 1234", "--seed 7"))
    result = cli("check", str(bundle))
    assert result.exit_code == 2, result.output
    assert ("jobs/rl/train.sh is edited (--tensor-model-parallel-size 3, "
            "--expert-model-parallel-size 5, --seed 7)") in result.stdout
    assert "not checked (no spec key renders them): --seed" in result.stdout
    assert ("jobs/rl/train.sh: error: train.parallelism.expert: num_experts 128 is not a "
            "multiple of expert parallel size 5 (edited: --expert-model-parallel-size 5)"
            in result.stderr), result.stderr
    assert ("jobs/rl/train.sh: error: train.parallelism.tensor: num_attention_heads 32 is not a "
            "multiple of tensor parallel size 3 (edited: --tensor-model-parallel-size 3)"
            in result.stderr)
    assert "--set" not in result.stderr
    train_sh.write_text(rendered.replace("--tensor-model-parallel-size 4",
                                         "--tensor-model-parallel-size 2"))
    result = cli("check", str(bundle))  # a layout that validates: said, and it passes
    assert result.exit_code == 0, result.output
    assert "jobs/rl/train.sh is edited (--tensor-model-parallel-size 2)" in result.stdout
    assert "every job's preflight passes" in result.stdout


def test_the_megatron_sft_flags_are_checked_like_the_trainers(tmp_path: Path) -> None:
    bundle = write_bundle(compile_spec(SINGLE, ["sft={steps: 10}"]).files, tmp_path / "b")
    assert cli("check", str(bundle)).exit_code == 0
    train_sh = bundle / "jobs" / "sft" / "train.sh"  # an operator edits a flag in place
    train_sh.write_text(train_sh.read_text().replace("--seq-length", "--seq-len"))
    result = cli("check", str(bundle))
    assert result.exit_code == 2 and "--seq-len" in result.stderr
    assert "jobs/sft/train.sh" in result.stderr and "(job sft" in result.stderr


def test_check_of_a_folder_that_is_no_bundle(tmp_path: Path) -> None:
    result = cli("check", str(tmp_path))
    assert result.exit_code == 2 and "not an rlspec bundle" in result.stderr
    assert "Traceback" not in result.output


def test_errors_of_the_checks_and_the_runtime_come_together() -> None:
    # A grid error (no bundle can be built) and a runtime refusal of the same file, at once.
    problems = _refused(SINGLE, ["train.parallelism.expert=3", "system.weight_sync=nccl"])
    assert {p.path[-1] for p in problems} >= {"expert", "weight_sync"}


def test_rlspec_run_writes_under_cluster_output_dir(tmp_path: Path) -> None:
    from compiler.runner import default_run_dir

    assert default_run_dir(compile_spec(TINY)) == Path("runs") / "tiny"
    moved = compile_spec(TINY, [f"cluster.output_dir={tmp_path / 'scratch'}"])
    assert default_run_dir(moved) == tmp_path / "scratch" / "tiny"


def test_more_nodes_are_refused_only_where_one_task_runs() -> None:
    """Slurm starts one task per node: Megatron and rollout nodes and a sharded screen pass
    there; the embedded trainer is one process on any scheduler."""
    from spec.loader import load_spec

    def rules(edits: list[str]) -> set[str]:
        spec = load_spec(TINY, ["cluster.scheduler=slurm", "cluster.partition=cpu", *edits]).spec
        dump = spec.model_dump(mode="json")
        return {r.rule for entry in ("rl", "screen") for r in capabilities.refusals(dump, entry)}

    assert rules(["train.nodes=2"]) == {"embedded_trainer_nodes"}
    assert rules([*CPU_MEGATRON, "train.nodes=2", "rollout.nodes=2", "filters[0].nodes=2"]) == set()


def test_a_smaller_proxy_model_is_checked_for_serving_not_against_the_policy(
        tmp_path: Path) -> None:
    """The screen's proxy is another model: a different architecture is its point. What it
    must meet is the engines' layout (heads over the rollout TP 8) and the screen's length."""
    big = EXAMPLES / "compassmax-245b.yaml"
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 4,
              "hidden_size": 512, "num_attention_heads": 16, "num_key_value_heads": 4,
              "max_position_embeddings": 40960, "vocab_size": 151936}
    (proxy / "config.json").write_text(json.dumps(config))
    compile_spec(big, [f"filters[0].proxy_model={proxy}"])  # no refusal: it can be served
    (proxy / "config.json").write_text(json.dumps({**config, "num_attention_heads": 12,
                                                   "max_position_embeddings": 4096}))
    with pytest.raises(SpecError) as err:
        compile_spec(big, [f"filters[0].proxy_model={proxy}"])
    messages = sorted(p.message for p in err.value.problems if p.path == ("filters", 0, "proxy_model"))
    assert len(messages) == 2, err.value
    assert messages[0].startswith("the proxy model's max_position_embeddings 4096")
    assert messages[1].startswith("the proxy model's num_attention_heads 12")
    assert "tensor parallel size 8" in messages[1]

"""The tiny run with ``train.backend: megatron``: convert → RL on the Megatron trainer → export.

Two CPU ranks (``cluster.gpus_per_node: 2``) as one tensor-parallel pair (TP 2 with sequence
parallelism, EP 2: half of every weight, half the experts per rank), R3 router replay, started by
``runtime.launch`` with ``file://`` rendezvous from the rendered ``train.sh`` and its
Megatron-LM flags, weights shared with the engine over shared memory (``weight_sync: ipc``). Checked: the conversion job's Megatron-LM layout, checkpoints under
``--save`` (one per step, ``keep`` newest, tracker), the published weights are what the
engines serve (train–inference gap at float precision), the KL penalty to the frozen
starting GPTModel is computed, the final HF policy equals the last
Megatron checkpoint exported, and ``to_hf`` converts the conversion job's checkpoint back
to the HF weights bit for bit. A second run, as two pipeline stages, is killed and resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runtime.exchange import RunPaths
from runtime.rollout.shared_weights import segment_path
from tests.helpers import launch_job, processes_mentioning

pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parents[2]
# megatron-core on the CPU runs the allgather dispatcher (validate refuses alltoall there).
ON_CPU = ["--set", "train.backend=megatron",
          "--set", "model.architecture.moe.token_dispatcher=allgather"]
MEGATRON = [*ON_CPU, "--set", "cluster.gpus_per_node=2",
            "--set", "train.parallelism.tensor=2", "--set", "train.parallelism.expert=2",
            "--set", "train.parallelism.sequence_parallel=true",
            "--set", "train.parallelism.expert_tensor=1",
            "--set", "train.checkpoint.interval=1", "--set", "train.checkpoint.keep=2"]
# The same two ranks as two pipeline stages (one layer each).
PIPELINE = [*ON_CPU, "--set", "cluster.gpus_per_node=2",
            "--set", "train.parallelism.pipeline=2", "--set", "train.checkpoint.interval=1",
            "--set", "train.checkpoint.keep=2"]
# The tiny example as a DeepSeek-V3-style model: MLA, a sigmoid router with the selection bias
# (updated by the Megatron trainer), one shared expert, one leading dense layer.
DEEPSEEK = ["--set", "model.architecture.family=deepseek_v3",
            "--set", "model.architecture.attention=mla",
            "--set", "model.architecture.num_query_groups=null",
            "--set", "model.architecture.head_dim=null",
            "--set", "model.architecture.mla={kv_lora_rank: 32, qk_head_dim: 32, "
                     "qk_pos_emb_head_dim: 32, v_head_dim: 32}",
            "--set", "model.architecture.moe.score_function=sigmoid",
            "--set", "model.architecture.moe.expert_bias=true",
            "--set", "model.architecture.moe.first_dense_layers=1",
            "--set", "model.architecture.moe.shared_experts=1",
            "--set", "model.architecture.moe.routed_scaling_factor=2.5"]
SHORT = ["--set", "sft.steps=10", "--set", "train.steps=3",
         "--set", "data.generator.train_size=300", "--set", "data.generator.eval_size=40"]


def rlspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def _megatron_export(root: Path, hf_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The HF state dict of the Megatron checkpoint ``root`` (world 1, in this process)."""
    from runtime.megatron import checkpoint as ckpt
    from runtime.megatron.hf_weights import gather_full_state_dict, megatron_to_hf
    from runtime.megatron.model import build_gpt_model
    from runtime.megatron.parallel import destroy_parallel, init_parallel
    from runtime.policy import load_policy

    hf, _ = load_policy(hf_dir)
    pg = init_parallel(0, 1, tmp / "rendezvous")
    try:
        model = build_gpt_model(hf.config, pg)
        ckpt.load_model(model, root)
        return megatron_to_hf(gather_full_state_dict(model), hf.config)
    finally:
        destroy_parallel()


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from runtime.policy import load_policy

    return load_policy(path)[0].state_dict()


def test_tiny_run_on_the_megatron_trainer(tmp_path: Path, megatron_cpu: None) -> None:
    out = tmp_path / "run"
    result = rlspec("run", "examples/tiny/spec.yaml", "--out", str(out), *MEGATRON, *SHORT,
                    "--set", "algorithm.kl.coefficient=0.1", "--set", "system.weight_sync=ipc")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["jobs"]) == ["data", "init", "sft", "convert", "eval_before", "screen",
                                     "rl", "eval_after", "export"]
    assert all(j["state"] == "COMPLETED" for j in summary["jobs"].values())

    # The SFT ran on the Megatron trainer too, in the same layout.
    assert "Megatron SFT: world 2 (TP 2, PP 1, EP 2, ETP 1, DP 1)" in (
        out / "logs" / "sft.log").read_text()
    train_log = (out / "logs" / "rl-train.log").read_text()
    assert "Megatron trainer: world 2 (TP 2, PP 1, EP 2, ETP 1, DP 1)" in train_log
    assert "weights from " + str(out / "artifacts" / "policy_megatron" / "release") in train_log

    # The conversion job's output: a Megatron-LM checkpoint root.
    converted = out / "artifacts" / "policy_megatron"
    assert (converted / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (converted / "release" / "metadata.json").is_file()
    assert _megatron_export(converted, out / "artifacts" / "policy_sft", tmp_path).keys() == \
        _hf_weights(out / "artifacts" / "policy_sft").keys()

    # Checkpoints under --save: one per step, the newest two kept, the tracker on the last.
    save = out / "checkpoints" / "megatron"
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert not list(save.glob(".*"))  # no partial checkpoint left behind

    # The engines served exactly the published Megatron weights, which the ranks wrote and
    # rank 0 shared (weight_sync ipc: every load mapped from shared memory, none from a folder, and
    # no segment left): the trainer's log-probs of the sampled tokens equal the engines' to
    # float precision (R3 replays their experts), and so do the two ranks' probe log-probs
    # (TP 2 + SP, EP 2) after each load.
    driver_log = (out / "logs" / "rl.log").read_text()
    assert "weights v1 mapped over IPC" in driver_log and "not over IPC" not in driver_log
    deadline = time.monotonic() + 60
    while processes_mentioning(str(out)):  # the trainer ranks end after the run (SIGTERM)
        assert time.monotonic() < deadline, "processes of the run are left"
        time.sleep(0.2)
    owner = RunPaths(out).owner
    assert not list(segment_path(owner, 0).parent.glob(f"rlspec-{owner}-v*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    trained = [r for r in rows if r["responses_trained"]]
    assert trained and all(r["train_inference_gap"] < 1e-5 for r in trained)
    assert all(r["weight_sync_probe_gap"] < 1e-5 for r in trained)
    assert all(r["grad_norm"] > 0 for r in trained)
    assert all(r["kl"] is not None for r in trained)  # the frozen reference GPTModel is there

    # The final HF policy is the last checkpoint's model, and training moved it.
    from runtime.megatron.hf_folder import FolderTensors

    final = dict(FolderTensors(out / "artifacts" / "policy_final"))
    start = dict(FolderTensors(out / "artifacts" / "policy_sft"))
    assert final.keys() == start.keys()
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-5
    exported = _megatron_export(save, out / "artifacts" / "policy_sft", tmp_path)
    policy_final = _hf_weights(out / "artifacts" / "policy_final")
    assert all(torch.equal(exported[k], policy_final[k]) for k in exported)

    # to_hf: the conversion job's Megatron checkpoint back to HF, bit for bit (a spec that
    # starts from a Megatron checkpoint gets this job for its rollout engines).
    sft = out / "artifacts" / "policy_sft"
    bundle = tmp_path / "from-megatron"
    compiled = rlspec("compile", "examples/tiny/spec.yaml", "-o", str(bundle), *MEGATRON,
                      "--set", f"model.checkpoint={converted}",
                      "--set", "model.checkpoint_format=megatron",
                      "--set", f"model.tokenizer={sft}", "--set", "sft=null")
    # (a checkpoint without config.json needs head_dim written out, as the tiny spec does:
    # compiler.checks.checkpoint_head_dim)
    assert compiled.returncode == 0, compiled.stderr
    job = launch_job(bundle, "to_hf", tmp_path / "to-hf")  # the ranks of the train layout
    assert job.returncode == 0, job.stderr[-3000:]
    assert "(world 2 (TP 2, PP 1, EP 2, ETP 1, DP 1)" in (
        tmp_path / "to-hf" / "logs" / "to_hf.log").read_text()
    back = _hf_weights(tmp_path / "to-hf" / "artifacts" / "policy_init")
    original = _hf_weights(sft)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in back)


@pytest.mark.parametrize(("edits", "world"), [
    ([*PIPELINE, "--set", "system.weight_sync=nccl", "--set",
      "model.architecture.tie_embeddings=true"], "TP 1, PP 2, EP 1, ETP 1, DP 1"),
    ([*MEGATRON, *DEEPSEEK], "TP 2, PP 1, EP 2, ETP 1, DP 1"),
], ids=["qwen3_moe-pp2", "deepseek_v3-tp2-ep2"])
def test_a_killed_megatron_run_resumes_from_its_checkpoint(tmp_path: Path, edits: list[str],
                                                           world: str) -> None:
    """SIGKILL the run's process group after two RL steps; the same command resumes: the trainer takes up
    the Megatron checkpoint of the driver's last complete step (model, optimizer shards) and
    every step is logged once, with R3 (the tiny example's). Two pipeline stages: publishing
    gathers both stages' layers, which rank 0 broadcasts to the engine (``weight_sync: nccl``;
    the resumed run's first load from its folder), with the embedding tied to the output
    layer (the last stage's copy of it saved and restored with the checkpoint); DeepSeek-V3 (MLA, sigmoid router and bias, shared expert,
    leading dense layer) over TP 2 × EP 2."""
    import signal

    out = tmp_path / "run"
    args = ["run", "examples/tiny/spec.yaml", "--out", str(out), *edits, *SHORT,
            "--set", "train.steps=6", "--set", "eval.enabled=false"]
    proc = subprocess.Popen([sys.executable, "-m", "compiler.main", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "artifacts" / "rl" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the RL job did not log two steps"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job at once, as a preempted node
    proc.communicate(timeout=60)
    while processes_mentioning(str(out)):  # PDEATHSIG is asynchronous
        assert time.monotonic() < deadline, "processes of the killed run are left"
        time.sleep(0.2)

    again = rlspec(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(6))
    log = (out / "logs" / "rl-train.log").read_text()
    assert f"Megatron trainer: world 2 ({world})" in log
    assert " (exact)" in log and "synced to step " in log, log[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(r["train_inference_gap"] < 1e-5 for r in rows if r["responses_trained"])
    assert (out / "checkpoints" / "megatron" / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert all(r["weight_sync_probe_gap"] < 1e-5 for r in rows)
    if "system.weight_sync=nccl" in edits:
        driver = (out / "logs" / "rl.log").read_text()
        assert "broadcast to the engines" in driver
        assert driver.count("not broadcast") == 1, driver[-3000:]  # the resumed first load

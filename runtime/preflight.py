"""Each job's start-up checks, run without weights, processes or GPUs.

A job's preflight is what the job itself checks before it does any work: the rules of
``runtime.capabilities`` for its entry point (what its trainer / engine / scheduler / devices
support), the Megatron-LM flags of ``jobs/rl/train.sh`` (parsed by the trainer's own parser,
``runtime.megatron.args``, so a flag edited in place is checked too), and the architecture
of an HF checkpoint the job starts from, where its ``config.json`` is readable.

Three callers run the same code:

* ``runtime.jobs.common.run_job``: every job, at start (:func:`preflight_context`); a
  refusal ends it before any work;
* ``rlspec validate`` / ``rlspec compile``: every job of the bundle they build, in memory;
* ``rlspec check DIR``: every job of a written bundle.

Torch-free (standard library and ``runtime.megatron.args``, which is argparse only).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtime import capabilities
from runtime.capabilities import ARCH, Refusal
from runtime.errors import JobError

__all__ = ["checkpoint_mismatches", "preflight_bundle", "preflight_context", "preflight_job",
           "train_sh_args", "trainer_argv"]

# A job's sibling file in the bundle (``jobs/<job>/<name>``), or None when absent.
JobFile = Callable[[str], "str | None"]


def trainer_argv(train_sh: str, module: str = "runtime.jobs.train") -> list[str]:
    """The arguments after ``-m <module>`` in a rendered ``train.sh`` (the RL trainer's, or
    ``runtime.jobs.sft``'s or ``runtime.jobs.convert``'s)."""
    lines, inside = [], False
    for line in train_sh.splitlines():
        if f"-m {module} " in line:
            inside = True
            line = line.split(f"-m {module}", 1)[1]
        if inside:
            lines.append(line.rstrip().rstrip("\\").strip())
            if not line.rstrip().endswith("\\"):
                break
    return shlex.split(" ".join(lines))


def train_sh_args(train_sh: str, entry: str) -> Any:
    """The Megatron trainer's parsed flags of a rendered ``train.sh``: the RL job's trainer
    (``entry`` rl), the SFT's or the conversion's. ``MegatronArgsError`` when one does not
    parse."""
    from runtime.megatron.args import parse_megatron_args

    rl = entry == "rl"
    return parse_megatron_args(
        trainer_argv(train_sh, "runtime.jobs.train" if rl else f"runtime.jobs.{entry}"),
        checkpoints=rl)


def _train_flags(config: Mapping[str, Any], job_file: JobFile) -> Iterator[Refusal]:
    """The Megatron trainer's flags (the RL, SFT or conversion job's) parse, and describe a
    layout it runs."""
    from runtime.megatron.args import MegatronArgsError

    job = str(config["job"])
    text = job_file("train.sh")
    if text is None:
        yield Refusal("train_flags", ("train", "backend"),
                      f"jobs/{job}/train.sh is missing from the bundle", "recompile the bundle")
        return
    try:
        args = train_sh_args(text, str(config["entry"]))
    except MegatronArgsError as exc:
        yield Refusal("train_flags", ("train",), str(exc),
                      f"recompile the bundle, or correct the flag in jobs/{job}/train.sh")
        return
    yield from capabilities.megatron_flag_refusals(args)


# --------------------------------------------------------------------------- checkpoints

def _hf_value(cfg: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if (key in ("rope_theta", "partial_rotary_factor")
                and isinstance(cfg.get("rope_parameters"), Mapping)):
            value = cfg["rope_parameters"].get("rope_theta")
            if value is not None:
                return value
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def checkpoint_mismatches(arch: Mapping[str, Any], cfg: Mapping[str, Any],
                          where: str) -> list[Refusal]:
    """Fields of ``model.architecture`` that differ from an HF ``config.json`` (only keys the
    config has are compared; unset spec values are compared as the model derives them)."""
    heads = arch["num_attention_heads"]
    pairs: list[tuple[tuple[str, ...], Any, tuple[str, ...]]] = [
        (("family",), arch["family"], ("model_type",)),
        (("num_layers",), arch["num_layers"], ("num_hidden_layers",)),
        (("hidden_size",), arch["hidden_size"], ("hidden_size",)),
        (("num_attention_heads",), heads, ("num_attention_heads",)),
        (("vocab_size",), arch["vocab_size"], ("vocab_size",)),
        (("max_position_embeddings",), arch["max_position_embeddings"],
         ("max_position_embeddings",)),
        (("rope_theta",), float(arch["rope_theta"]), ("rope_theta",)),
        (("tie_embeddings",), arch["tie_embeddings"], ("tie_word_embeddings",)),
    ]
    moe = arch.get("moe")
    if moe is None or moe["first_dense_layers"] > 0:  # the dense FFN exists
        pairs.append((("ffn_hidden_size",), arch["ffn_hidden_size"], ("intermediate_size",)))
    if arch["attention"] == "gqa":
        pairs += [
            (("num_query_groups",), arch["num_query_groups"] or heads, ("num_key_value_heads",)),
            (("head_dim",), arch["head_dim"] or arch["hidden_size"] // heads, ("head_dim",)),
        ]
    if arch["family"] == "glm4_moe":  # the two GLM-4.5 checkpoints differ in q/k norms
        pairs += [
            (("qk_norm",), capabilities.qk_norm(arch), ("use_qk_norm",)),
            (("partial_rotary_factor",), capabilities.rotary_percent(arch),
             ("partial_rotary_factor",)),
        ]
    if moe is not None:
        pairs += [
            (("moe", "num_experts"), moe["num_experts"], ("num_experts", "n_routed_experts")),
            (("moe", "top_k"), moe["top_k"], ("num_experts_per_tok",)),
            (("moe", "expert_ffn_hidden_size"), moe["expert_ffn_hidden_size"],
             ("moe_intermediate_size",)),
            (("moe", "norm_topk_prob"), moe["norm_topk_prob"], ("norm_topk_prob",)),
        ]
    out = []
    for field, want, keys in pairs:
        have = _hf_value(cfg, *keys)
        if have is None:
            continue
        if isinstance(want, float):
            have = float(have)
        if have != want:
            name = ".".join(field)
            out.append(Refusal(
                "checkpoint", (*ARCH, *field),
                f"{name} is {want!r} but the checkpoint's config.json ({where}) has "
                f"{keys[0]} = {have!r}",
                f"set model.architecture.{name}: {json.dumps(have)}"))
    return out


def _proxy_mismatches(spec: Mapping[str, Any], cfg: Mapping[str, Any],
                      cfg_file: str) -> Iterator[Refusal]:
    """The screen's proxy model is another model than the policy: only what serving it in the
    rollout layout needs is checked (its heads over the engines' TP, its positions over the
    screen's prompt + response)."""
    stage = next(i for i, s in enumerate(spec["filters"]) if s["type"] == "offline_pass_rate")
    path = ("filters", stage, "proxy_model")
    tp = int(spec["rollout"]["parallelism"]["tensor"]) if spec["rollout"]["engine"] == "vllm" else 1
    heads = cfg.get("num_attention_heads")
    if isinstance(heads, int) and heads % tp:
        yield Refusal("checkpoint", path,
                      f"the proxy model's num_attention_heads {heads} ({cfg_file}) is not a "
                      f"multiple of the engines' tensor parallel size {tp}",
                      "choose a proxy whose heads TP divides, or proxy_model: policy")
    need = int(spec["data"]["max_prompt_tokens"]) + int(spec["rollout"]["max_tokens"])
    positions = cfg.get("max_position_embeddings")
    if isinstance(positions, int) and positions < need:
        yield Refusal("checkpoint", path,
                      f"the proxy model's max_position_embeddings {positions} ({cfg_file}) is "
                      f"below the screen's max_prompt_tokens + max_tokens = {need}",
                      "choose a proxy with a longer context, or proxy_model: policy")


def _checkpoints(config: Mapping[str, Any], base: Path | None) -> Iterator[Refusal]:
    """An external HF checkpoint the job reads, compared with the spec where readable (the
    policy field by field, and not quantized for the Megatron trainer; the screen's proxy
    model for what serving it needs)."""
    arch = config["spec"]["model"]["architecture"]
    for name, art in (config.get("inputs") or {}).items():
        if not art.get("external") or art.get("kind") != "hf_checkpoint":
            continue
        path = Path(str(art["path"]))
        if not path.is_absolute():
            if base is None:
                continue
            path = base / path
        cfg_file = path / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not readable from here (e.g. a compute-node mount)
            continue
        if isinstance(cfg, dict) and name == "proxy_model":
            yield from _proxy_mismatches(config["spec"], cfg, str(cfg_file))
        elif isinstance(cfg, dict):
            yield from checkpoint_mismatches(arch, cfg, str(cfg_file))
            yield from _quantized(config, cfg, str(cfg_file))


def _quantized(config: Mapping[str, Any], cfg: Mapping[str, Any],
               cfg_file: str) -> Iterator[Refusal]:
    """The Megatron trainer (and the conversion on its ranks) reads the policy's tensors as
    they are stored: a quantized checkpoint's are not its weights (e.g. DeepSeek-V3's FP8
    blocks and their scales)."""
    quantized = cfg.get("quantization_config")
    if (quantized and config["entry"] in ("rl", "sft", "convert")
            and config["spec"]["train"]["backend"] == "megatron"):
        method = (quantized.get("quant_method") if isinstance(quantized, dict) else None) or "?"
        yield Refusal("checkpoint", ("model", "checkpoint"),
                      f"the checkpoint is {method}-quantized ({cfg_file}: quantization_config); "
                      "the Megatron trainer loads unquantized weights",
                      "dequantize it to bf16 first (e.g. DeepSeek-V3's fp8_cast_bf16.py), "
                      "remove quantization_config from the result's config.json, and point "
                      "model.checkpoint at it")


# --------------------------------------------------------------------------- one-process jobs

# Bytes per parameter a one-process job holds on its GPU: the serving dtype for the engine of
# screen / eval; fp32 weights, gradients and AdamW's two moments for SFT.
_ENGINE_BYTES = {"bf16": 2, "fp32": 4}
_SFT_BYTES = 16


def _one_gpu_memory(config: Mapping[str, Any]) -> Iterator[Refusal]:
    """The embedded SFT (train.backend local; Megatron's runs in the train layout) and screen /
    eval on the embedded engine hold the whole policy in one process on one GPU: it must fit."""
    spec, entry = config["spec"], config["entry"]
    if spec["cluster"]["devices"] != "gpu" or entry not in ("sft", "screen", "evaluate"):
        return
    if entry == "sft" and spec["train"]["backend"] == "megatron":
        return  # the Megatron trainer's layout: the memory check's estimate
    if entry != "sft" and spec["rollout"]["engine"] == "vllm":
        return  # served by the job's vLLM replicas, in the rollout layout
    if entry == "screen" and not any(f["type"] == "offline_pass_rate"
                                     and f["proxy_model"] == "policy" for f in spec["filters"]):
        return  # a proxy model's size is not in the spec
    total = (config.get("derived") or {}).get("params", {}).get("total")
    if not total:
        return
    per = _SFT_BYTES if entry == "sft" else _ENGINE_BYTES[spec["train"]["precision"]]
    need, have = total * per / 1e9, float(spec["cluster"]["gpu_memory_gb"])
    if need > have:
        what = "SFT trains" if entry == "sft" else "the embedded engine serves"
        path: tuple[str, ...] = ("sft",) if entry == "sft" else (
            ("eval", "enabled") if entry == "evaluate" else ("filters",))
        yield Refusal("one_gpu_memory", path,
                      f"{what} the whole {total / 1e9:,.1f} B-parameter policy in one process on "
                      f"one GPU: {need:,.0f} GB > {have:g} GB",
                      {"sft": "set train.backend: megatron (SFT in the train layout), or "
                              "remove the sft section (start from an SFT checkpoint)",
                       "evaluate": "set eval.enabled: false (eval.every_steps still evaluates "
                                   "on the rollout engines inside the RL job)",
                       "screen": "screen with a smaller proxy_model"}[entry])


# --------------------------------------------------------------------------- jobs


def preflight_job(config: Mapping[str, Any], job_file: JobFile,
                  base: Path | None = None) -> list[Refusal]:
    """Every refusal of one job, from its config and its sibling files. ``base`` resolves
    relative external paths (the spec's folder); None skips reading checkpoints."""
    job, entry, spec = str(config["job"]), str(config["entry"]), config["spec"]
    found = capabilities.refusals(spec, entry, job)
    if entry in ("rl", "sft", "convert") and spec["train"]["backend"] == "megatron":
        found += [replace(r, job=job) for r in _train_flags(config, job_file)]
    found += [replace(r, job=job) for r in _checkpoints(config, base)]
    found += [replace(r, job=job) for r in _one_gpu_memory(config)]
    return found


def preflight_context(ctx: Any) -> None:
    """A starting job's own checks: the library versions (``runtime.versions``), then
    :func:`preflight_job` of its context (a
    ``runtime.jobs.common.JobContext``: config, config_path, spec, bundle_dir), with its sibling
    files read from the bundle. The same checks `rlspec validate` ran on the bundle, so a
    refusal here means the bundle was edited or built elsewhere: a JobError naming each one."""

    def sibling(name: str) -> str | None:
        path = Path(ctx.config_path).parent / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    from runtime.versions import version_problems

    problems = version_problems()
    if problems:
        raise JobError("refused at start: " + "; ".join(problems))
    refused = preflight_job({**ctx.config, "spec": ctx.spec}, sibling, Path(ctx.bundle_dir).parent)
    if refused:
        raise JobError("refused at start: " + "; ".join(
            f"{'.'.join(map(str, r.path))}: {r.message} ({r.hint})" for r in refused))


def preflight_bundle(files: Mapping[str, str], base: Path | None = None) -> list[Refusal]:
    """Every job's preflight over a bundle's files (relative path → text), in graph order."""
    manifest = json.loads(files["manifest.json"])
    out: list[Refusal] = []
    for job in manifest["order"]:
        config = json.loads(files[f"jobs/{job}/config.json"])
        out += preflight_job(config, lambda name, j=job: files.get(f"jobs/{j}/{name}"), base)
    return out


def read_bundle(bundle: str | os.PathLike[str]) -> dict[str, str]:
    """The text files a preflight reads from a written bundle (manifest, configs, scripts)."""
    root = Path(bundle)
    files = {"manifest.json": (root / "manifest.json").read_text(encoding="utf-8")}
    for job in json.loads(files["manifest.json"])["order"]:
        for name in ("config.json", "train.sh"):
            path = root / "jobs" / job / name
            if path.is_file():
                files[f"jobs/{job}/{name}"] = path.read_text(encoding="utf-8")
    return files


"""The Megatron-LM flags of ``jobs/rl/train.sh`` against their one reader, ``runtime.megatron.args``.

Every flag a rendered bundle passes is known to the parser (a template change that renames or
adds a flag fails here, not in the cluster job), the model flags describe the checkpoint's
HF config, and the batch / optimizer flags are what the trainer runs with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compiler.api import compile_spec
from runtime.megatron.args import (
    MegatronArgsError,
    check_architecture,
    parse_megatron_args,
    train_settings,
)
from runtime.policy import build_tokenizer, policy_config
from runtime.preflight import trainer_argv

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"


def tiny_megatron_train_sh(tmp_path: Path, train: dict | None = None, replay: str | None = None,
                           sections: dict | None = None, **edits: object) -> tuple[str, dict]:
    """The tiny example on the Megatron trainer (EP 2): its rendered jobs/rl/train.sh and spec;
    ``train`` entries and ``sections`` (e.g. ``{"cluster": {"devices": "gpu"}}``) replace the
    example's, ``edits`` its architecture's."""
    spec = yaml.safe_load((ROOT / "examples" / "tiny" / "spec.yaml").read_text())
    if replay is not None:
        spec["router_replay"]["mode"] = replay
    spec["train"]["parallelism"] = {"expert": 2}
    for key, value in (train or {}).items():
        spec["train"][key] = {**spec["train"][key], **value} if isinstance(value, dict) else value
    spec["train"]["backend"] = "megatron"
    spec["cluster"]["gpus_per_node"] = 2
    for section, entries in (sections or {}).items():
        spec[section].update(entries)
    spec["model"]["architecture"]["moe"]["token_dispatcher"] = "allgather"
    for key, value in edits.items():
        spec["model"]["architecture"][key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    compiled = compile_spec(path)
    return compiled.files["jobs/rl/train.sh"], spec


@pytest.mark.parametrize("bundle", ["compassmax-245b", "qwen3-30b-a3b"])
def test_every_flag_of_the_golden_bundles_parses(bundle: str) -> None:
    args = parse_megatron_args(trainer_argv((GOLDEN / bundle / "jobs" / "rl" / "train.sh").read_text()))
    assert args.config == "$JOB_DIR/config.json"
    assert args.load.endswith("policy_megatron") and args.save.endswith("checkpoints/megatron")
    if bundle == "compassmax-245b":
        assert args.expert_model_parallel_size == 8 and args.num_experts == 16
        assert args.use_distributed_optimizer and args.bf16


def test_the_model_flags_describe_the_checkpoint(tmp_path: Path) -> None:
    text, spec = tiny_megatron_train_sh(tmp_path)
    args = parse_megatron_args(trainer_argv(text))
    arch = spec["model"]["architecture"]
    config = policy_config(arch, build_tokenizer(int(arch["vocab_size"])))
    check_architecture(args, config)  # the bundle's own checkpoint: no difference

    other, _ = tiny_megatron_train_sh(tmp_path, num_layers=3, hidden_size=32)
    with pytest.raises(MegatronArgsError) as err:
        check_architecture(parse_megatron_args(trainer_argv(other)), config)
    message = str(err.value)
    assert "--num-layers 3 (the checkpoint has 2)" in message
    assert "--hidden-size 32 (the checkpoint has 128)" in message
    assert "--num-attention-heads" not in message  # only what differs


def test_the_deepseek_flags_describe_the_checkpoint(tmp_path: Path) -> None:
    """MLA, the sigmoid router, its bias, shared experts, routed scaling and the group limit
    reach train.sh and are compared with a DeepSeek-V3 checkpoint's config."""
    from runtime.megatron.args import bias_update_rate
    from tests.families import tiny_deepseek_arch

    def flags(**moe: object) -> tuple[object, object]:
        arch = {**tiny_deepseek_arch(), "num_query_groups": None}
        arch["moe"].update(moe)
        text, spec = tiny_megatron_train_sh(tmp_path, **arch)
        return parse_megatron_args(trainer_argv(text)), spec["model"]["architecture"]

    args, arch = flags()
    assert args.multi_latent_attention and args.q_lora_rank == 32 and args.v_head_dim == 32
    assert args.moe_router_score_function == "sigmoid" and args.moe_router_enable_expert_bias
    assert (args.moe_router_topk_scaling_factor, args.moe_router_num_groups,
            args.moe_router_group_topk) == (2.5, 4, 1)
    assert args.moe_shared_expert_intermediate_size == 32 and args.moe_layer_freq == [0, 1]
    assert bias_update_rate(args) == 1e-3
    config = policy_config(arch, build_tokenizer(64))
    check_architecture(args, config)
    other, _ = flags(routed_scaling_factor=1.0, num_groups=None, group_top_k=None,
                     expert_bias=False, shared_experts=2)
    assert bias_update_rate(other) == 0.0
    with pytest.raises(MegatronArgsError) as err:
        check_architecture(other, config)
    message = str(err.value)
    for flag in ("--moe-router-topk-scaling-factor 1.0 (the checkpoint has 2.5)",
                 "--moe-router-num-groups 1 (the checkpoint has 4)",
                 "--moe-shared-expert-intermediate-size 64 (the checkpoint has 32)"):
        assert flag in message
    mla_other, _ = tiny_megatron_train_sh(tmp_path, **{
        **tiny_deepseek_arch(), "num_query_groups": None, "mla": {**tiny_deepseek_arch()["mla"], "q_lora_rank": None,
                                        "kv_lora_rank": 16}})
    with pytest.raises(MegatronArgsError) as err:
        check_architecture(parse_megatron_args(trainer_argv(mla_other)), config)
    assert "--kv-lora-rank 16 (the checkpoint has 32)" in str(err.value)
    assert "--q-lora-rank None (the checkpoint has 32)" in str(err.value)
    qwen = policy_config(spec_arch := yaml.safe_load(
        (ROOT / "examples" / "tiny" / "spec.yaml").read_text())["model"]["architecture"],
        build_tokenizer(int(spec_arch["vocab_size"])))
    with pytest.raises(MegatronArgsError, match="--multi-latent-attention is set"):
        check_architecture(args, qwen)


def test_the_glm_flags_describe_the_checkpoint(tmp_path: Path) -> None:
    """GLM-4.5: the qkv bias, no q/k norm and half-rotary RoPE (the family's, or the spec's
    partial_rotary_factor) reach train.sh as --add-qkv-bias / --rotary-percent, with the
    sigmoid router, its bias and shared experts, and are compared with the checkpoint's config."""
    from tests.families import tiny_glm_arch

    def flags(**edits: object) -> tuple[object, object]:
        text, spec = tiny_megatron_train_sh(tmp_path, **{**tiny_glm_arch(), **edits})
        return parse_megatron_args(trainer_argv(text)), spec["model"]["architecture"]

    args, arch = flags()
    assert args.add_qkv_bias and not args.qk_layernorm and args.rotary_percent == 0.5
    assert not args.multi_latent_attention and args.num_query_groups == 2
    assert args.moe_router_score_function == "sigmoid" and args.moe_router_enable_expert_bias
    assert args.moe_shared_expert_intermediate_size == 32 and args.moe_layer_freq == [0, 1]
    assert args.moe_router_topk_scaling_factor == 2.5
    config = policy_config(arch, build_tokenizer(64))
    check_architecture(args, config)
    quarter, _ = flags(partial_rotary_factor=0.25, qk_norm=True)  # GLM-4.5 (355B): q/k norms
    assert quarter.rotary_percent == 0.25 and quarter.qk_layernorm
    with pytest.raises(MegatronArgsError) as err:
        check_architecture(quarter, config)
    assert "--rotary-percent 0.25 (the checkpoint has 0.5)" in str(err.value)
    assert "--qk-layernorm True (the checkpoint has False)" in str(err.value)
    qwen = policy_config(yaml.safe_load((ROOT / "examples" / "tiny" / "spec.yaml").read_text())
                         ["model"]["architecture"], build_tokenizer(64))
    with pytest.raises(MegatronArgsError) as err:
        check_architecture(args, qwen)
    for flag in ("--qk-layernorm False (the checkpoint has True)",
                 "--add-qkv-bias True (the checkpoint has False)",
                 "--rotary-percent 0.5 (the checkpoint has 1.0)",
                 "--moe-router-score-function sigmoid (the checkpoint has softmax)"):
        assert flag in str(err.value)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_the_dense_flags_describe_the_checkpoint(tmp_path: Path, family: str) -> None:
    """A dense model renders no MoE flag (no expert grid either) and --qk-layernorm for Qwen3
    only; a dense checkpoint under MoE flags, or the other family's norms, is an error."""
    from tests.families import tiny_dense_arch

    text, spec = tiny_megatron_train_sh(tmp_path, train={"parallelism": {"expert": 1}},
                                        replay="off", **tiny_dense_arch(family), moe=None)
    assert "--num-experts" not in text and "--expert-model-parallel-size" not in text
    args = parse_megatron_args(trainer_argv(text))
    assert args.num_experts is None and args.qk_layernorm == (family == "qwen3")
    assert not args.add_qkv_bias and args.rotary_percent == 1.0
    config = policy_config(spec["model"]["architecture"], build_tokenizer(64))
    check_architecture(args, config)
    other = "llama" if family == "qwen3" else "qwen3"
    with pytest.raises(MegatronArgsError, match=f"--qk-layernorm {family == 'qwen3'} "):
        check_architecture(args, policy_config({**spec["model"]["architecture"],
                                                "family": other}, build_tokenizer(64)))
    moe, _ = tiny_megatron_train_sh(tmp_path)
    with pytest.raises(MegatronArgsError, match="--num-experts 8 \\(the checkpoint has None\\)"):
        check_architecture(parse_megatron_args(trainer_argv(moe)), config)


def test_the_flags_set_batch_and_optimizer(tmp_path: Path) -> None:
    text, spec = tiny_megatron_train_sh(tmp_path)
    argv = [a if a != "0.0005" else "0.002" for a in trainer_argv(text)]  # --lr edited in place
    settings = train_settings(parse_megatron_args(argv), spec["train"])
    assert settings["optimizer"]["lr"] == 0.002
    assert settings["micro_batch_size"] == 16 and settings["global_batch_size"] == 128
    assert settings["optimizer"]["distributed"] is True
    assert settings["steps"] == spec["train"]["steps"]  # the rest of the section is kept


def test_the_optimizer_and_seed_of_the_spec_reach_the_megatron_trainer(tmp_path: Path) -> None:
    """Each non-default value of train.optimizer and train.seed goes through its train.sh flag
    into the settings the Megatron trainer builds its OptimizerConfig and seeds from."""
    opt = {"weight_decay": 0.25, "adam_beta1": 0.5, "adam_beta2": 0.75, "adam_eps": 1e-3,
           "clip_grad": 0.125}
    text, spec = tiny_megatron_train_sh(tmp_path, train={"optimizer": opt, "seed": 7})
    settings = train_settings(parse_megatron_args(trainer_argv(text)), spec["train"])
    assert {k: settings["optimizer"][k] for k in opt} == opt
    assert settings["seed"] == 7
    (tmp_path / "default").mkdir()
    default, _ = tiny_megatron_train_sh(tmp_path / "default")
    plain = train_settings(parse_megatron_args(trainer_argv(default)), spec["train"])
    assert all(plain["optimizer"][k] != v for k, v in opt.items()) and plain["seed"] == 1234


def test_unknown_and_malformed_flags_are_one_clear_error(tmp_path: Path) -> None:
    text, _ = tiny_megatron_train_sh(tmp_path)
    argv = trainer_argv(text)
    with pytest.raises(MegatronArgsError, match="unrecognized arguments: --moe-router-top-k"):
        parse_megatron_args([*argv, "--moe-router-top-k", "2"])
    with pytest.raises(MegatronArgsError, match="--moe-layer-freq"):
        parse_megatron_args([*argv, "--moe-layer-freq", "[1]*4"])
    freq = parse_megatron_args([*argv, "--moe-layer-freq", "([0]*1+[1]*1)"]).moe_layer_freq
    assert freq == [0, 1]


def test_optimizer_cpu_offload_reaches_the_megatron_trainer() -> None:
    """train.optimizer.cpu_offload / offload_fraction render Megatron-LM's offload flags,
    which set the trainer's OptimizerConfig; the flag rule refuses an offload outside the
    distributed optimizer."""
    from runtime.capabilities import megatron_flag_refusals

    compiled = compile_spec(ROOT / "examples" / "qwen3-30b-a3b.yaml",
                            ["train.optimizer.cpu_offload=true"])
    argv = trainer_argv(compiled.files["jobs/rl/train.sh"])
    assert {"--optimizer-cpu-offload", "--use-precision-aware-optimizer"} <= set(argv)
    assert argv[argv.index("--optimizer-offload-fraction") + 1] == "1.0"
    train = {"optimizer": {}}
    settings = train_settings(parse_megatron_args(argv), train)["optimizer"]
    assert (settings["cpu_offload"], settings["offload_fraction"]) == (True, 1.0)
    edited = [a if a != "1.0" or argv[i - 1] != "--optimizer-offload-fraction" else "0.25"
              for i, a in enumerate(argv)]
    assert train_settings(parse_megatron_args(edited), train)["optimizer"]["offload_fraction"] == 0.25
    plain = trainer_argv((GOLDEN / "qwen3-30b-a3b" / "jobs" / "rl" / "train.sh").read_text())
    assert not train_settings(parse_megatron_args(plain), train)["optimizer"]["cpu_offload"]
    assert megatron_flag_refusals(parse_megatron_args(argv)) == []
    lone = [a for a in argv if a != "--use-distributed-optimizer"]
    assert [r.path for r in megatron_flag_refusals(parse_megatron_args(lone))] == [
        ("train", "optimizer", "cpu_offload")]


def test_rope_head_dim_positions_and_tying_reach_the_flags_and_must_match_the_checkpoint(
        tmp_path: Path) -> None:
    """rope_theta, head_dim, max_position_embeddings and tie_embeddings are rendered as
    --rotary-base, --kv-channels, --max-position-embeddings and (the absence of)
    --untie-embeddings-and-output-weights, and the trainer's preflight compares each with
    the checkpoint it starts from: the bundle's own checkpoint passes, another is refused."""
    edits = {"rope_theta": 5000.0, "head_dim": 24, "max_position_embeddings": 512,
             "tie_embeddings": True}
    text, spec = tiny_megatron_train_sh(tmp_path, **edits)
    args = parse_megatron_args(trainer_argv(text))
    assert (args.rotary_base, args.kv_channels, args.max_position_embeddings) == (5000, 24, 512)
    assert not args.untie_embeddings_and_output_weights
    arch = spec["model"]["architecture"]
    tokenizer = build_tokenizer(int(arch["vocab_size"]))
    check_architecture(args, policy_config(arch, tokenizer))  # its own checkpoint

    default, base = tiny_megatron_train_sh(tmp_path)
    default_args = parse_megatron_args(trainer_argv(default))
    assert default_args.rotary_base == 1_000_000 and default_args.untie_embeddings_and_output_weights
    with pytest.raises(MegatronArgsError) as err:  # the flags of the spec, another checkpoint
        check_architecture(args, policy_config(base["model"]["architecture"], tokenizer))
    message = str(err.value)
    for flag in ("--rotary-base 5000.0 (the checkpoint has 1000000.0)",
                 "--kv-channels 24 (the checkpoint has 32)",
                 "--max-position-embeddings 512 (the checkpoint has 256)",
                 "--untie-embeddings-and-output-weights False (the checkpoint has True)"):
        assert flag in message
    only_rope = policy_config({**arch, "rope_theta": 10000.0}, tokenizer)
    with pytest.raises(MegatronArgsError, match=r"--rotary-base 5000\.0 \(the checkpoint has "
                                                r"10000\.0\)") as err:
        check_architecture(args, only_rope)
    assert "--kv-channels" not in str(err.value)


def test_context_parallel_reaches_the_train_jobs_model_overrides(tmp_path: Path) -> None:
    """``train.parallelism.context: 2`` → ``--context-parallel-size 2`` → no layout refusal,
    and the train job builds its GPTModel with ``context_parallel_size`` 2 (its
    ``init_parallel`` takes the same flag)."""
    from runtime.capabilities import megatron_flag_refusals
    from runtime.megatron.args import model_overrides

    text, _ = tiny_megatron_train_sh(tmp_path, train={"parallelism": {"context": 2,
                                                                       "expert": 1}})
    args = parse_megatron_args(trainer_argv(text))
    assert args.context_parallel_size == 2
    assert megatron_flag_refusals(args) == []
    assert model_overrides(args)["context_parallel_size"] == 2

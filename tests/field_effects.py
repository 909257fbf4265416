"""The field-effect table: for every field of every spec model, the evidence of its effect on
each path a spec selects, or the check that refuses it there (no dead knobs).

``tests/spec/test_field_effects.py`` walks every model reachable from ``spec.models.Spec`` and
holds this table to it: every field has an entry, every entry names a field, and every piece of
evidence names something that exists.

Key: ``"<ModelClass>.<field>"``. Value: path selector → evidence.

Path selectors: ``"all"`` (one effect, whatever the path; alone), or the paths the field
behaves differently on, one dimension value or several joined by ``+``:

    train:local    train:megatron        (train.backend)
    rollout:local  rollout:vllm          (rollout.engine)
    scheduler:local scheduler:slurm      (cluster.scheduler)
    devices:cpu    devices:gpu           (cluster.devices)

e.g. ``"train:megatron+devices:gpu"``. The selectors of one entry must cover every combination
of the dimensions they mention (``train:local`` and ``train:megatron``, or ``train:local``,
``train:megatron+devices:cpu`` and ``train:megatron+devices:gpu``, ...). Where selectors of
different dimensions overlap, all of their evidence applies.

Evidence: one string, or a tuple of strings that apply together:

    "test:<path/to/test_file.py>::<test>"  a test whose outcome depends on the field on that
                                           path (``Class::method`` for methods of test classes).
                                           Render-only fields name the golden / flag test that
                                           pins their line; the comment names the flag.
    "check:<rule>"     a rule of ``compiler.checks.RULES`` that reads the field. Alone (on every
                       path) only for the fields of ``COMPILE_TIME``; elsewhere next to a test.
    "refused:<rule>"   that path refuses the field (validate exits 2): a rule of
                       ``runtime.capabilities.RULES``.
    "warned:<rule>"    a warning of that ``compiler.checks`` rule says the field has no effect
                       there (harmless).
    "section:<Model>"  a required (or default-built) sub-section: it has no value of its own,
                       its effect is its fields', each of which has its own entry.
    "doc"              no behaviour by design: ``Spec.description`` and fields whose type
                       admits exactly one value (a label kept for future choices).
    "MISSING"          no evidence yet (alone, or next to the evidence of the part of that
                       path that has some): ``MISSING[key]`` says what is missing; the
                       meta-test ``test_no_field_lacks_evidence`` fails while any is left.

Refusal names are those of ``runtime.capabilities.RULES`` (``megatron_layout``: its
``FLAG_RULES``, the rule of the rendered train.sh flags), including ``megatron_cpu``,
``recompute`` and ``tokenizer``.

Standard of evidence: the test sets the field to a non-default value, or varies it, and an
assertion would fail were the field ignored on that path. A test that only runs the default
is not evidence. Where the spec value reaches a runtime function unchanged (the losses, the
filter stages, the reward composer, the arithmetic generator), a test of that function that
varies the parameter counts.
"""

from __future__ import annotations

Evidence = str | tuple[str, ...]

# Test files named below, shortened.
BUNDLE = "tests/compiler/test_bundle.py"
CHECKS = "tests/compiler/test_checks.py"
CLI = "tests/compiler/test_cli.py"
PLAN = "tests/compiler/test_plan.py"
ADV = "tests/runtime/test_advantages.py"
EVAL = "tests/runtime/test_jobs_eval_screen_export.py"
DATA = "tests/runtime/test_jobs_data_init.py"
FILTERS = "tests/runtime/test_filters.py"
LOSSES = "tests/runtime/test_losses.py"
MARGS = "tests/runtime/test_megatron_args.py"
POLICY = "tests/runtime/test_policy.py"
REWARDS = "tests/runtime/test_rewards.py"
RL = "tests/runtime/test_rl_job.py"
PROMPTS = "tests/runtime/test_prompts.py"
ROLLOUT = "tests/runtime/test_rollout.py"
FP8 = "tests/runtime/test_fp8.py"
REPLAY = "tests/runtime/test_router_replay.py"
RUN = "tests/runtime/test_run.py"
TASKS = "tests/runtime/test_tasks.py"
TRAINER = "tests/runtime/test_trainer.py"
WT = "tests/runtime/test_weight_transfer.py"
SHARED = "tests/runtime/test_shared_weights.py"
BROADCAST = "tests/runtime/test_broadcast_weights.py"
MCORE_RUN = "tests/megatron/test_mcore_run.py"
MCORE_PRECISION = "tests/megatron/test_mcore_precision.py"
MCORE_TRAINER = "tests/megatron/test_mcore_trainer.py"
DRIVER = "tests/runtime/test_driver.py"
DEEPSEEK = "tests/runtime/test_deepseek.py"
MCORE_DEEPSEEK = "tests/megatron/test_mcore_deepseek.py"
MCORE_GLM = "tests/megatron/test_mcore_glm.py"
MCORE_DENSE = "tests/megatron/test_mcore_dense.py"
MCORE_SFT = "test:tests/megatron/test_mcore_sft.py::test_megatron_sft_is_the_embedded_sft"
SLURM = "tests/slurm/test_slurm.py"
VLLM = "tests/vllm_flags/test_vllm_flags.py"
VLLM_RUN = "tests/vllm/test_vllm_tiny_run.py"
VLLM_ENGINE = "tests/vllm/test_vllm_engine.py"


def t(path: str, test: str) -> str:
    return f"test:{path}::{test}"


GOLDEN = t(BUNDLE, "test_golden_bundle")
JOBS_FOLLOW = t(BUNDLE, "test_jobs_follow_from_the_spec")
SPLIT_245B = t(BUNDLE, "test_245b_rl_job_splits_nodes_and_launches_every_role")
SHELL = t(BUNDLE, "test_values_reaching_the_shell_are_quoted")
DRY_RUN = t(CLI, "test_submit_dry_run_prints_the_slurm_requests")
SLURM_RESOURCES = t(BUNDLE, "test_sbatch_asks_for_whole_gpu_nodes_and_cpus_for_every_rank")
LOCAL_RESOURCES = t(CHECKS, "test_slurm_resources_set_on_a_local_spec_are_warned")
RL_E2E = t(RL, "test_rl_job_end_to_end")
MCORE_TINY = t(MCORE_RUN, "test_tiny_run_on_the_megatron_trainer")
MCORE_PP = t(MCORE_RUN, "test_a_killed_megatron_run_resumes_from_its_checkpoint")
CONFIG_MAP = t(POLICY, "test_config_mapping")
# DeepSeek-V3: the HF config of the spec (embedded), the train.sh flags compared with it and
# the megatron-core model equal to HF (Megatron).
DS_CONFIG = t(DEEPSEEK, "test_config_mapping")
DS_FLAGS = t(MARGS, "test_the_deepseek_flags_describe_the_checkpoint")
DS_MCORE = t(MCORE_DEEPSEEK, "test_logprobs_gradients_and_export_match_hf")
DS_R3 = t(MCORE_DEEPSEEK, "test_r3_with_the_sigmoid_router_replays_the_recorded_experts")
# GLM-4.5 (qkv bias, partial RoPE, DeepSeek-V3's MoE) and the dense qwen3 / llama: the HF config
# of the spec (embedded), the train.sh flags compared with it, the megatron-core model equal to HF.
GLM_CONFIG = t(POLICY, "test_glm4_moe_config_mapping")
GLM_FLAGS = t(MARGS, "test_the_glm_flags_describe_the_checkpoint")
GLM_MCORE = t(MCORE_GLM, "test_logprobs_gradients_and_export_match_hf")
DENSE_FLAGS = t(MARGS, "test_the_dense_flags_describe_the_checkpoint")
DENSE_MCORE = t(MCORE_DENSE, "test_logprobs_gradients_and_export_match_hf")
ARCH_FLAGS = t(MARGS, "test_the_model_flags_describe_the_checkpoint")
OPT_FLAGS = t(MARGS, "test_the_flags_set_batch_and_optimizer")
# init's checkpoint of an edited architecture (config.json, the loaded model, its tokenizer,
# the embedded engine's context), and the train.sh flags of the same fields compared with the
# checkpoint by the Megatron trainer's preflight (runtime.megatron.args.check_architecture).
INIT_ARCH = t(DATA, "test_init_builds_head_dim_positions_rope_and_tied_embeddings_of_the_spec")
ARCH_CKPT = t(MARGS, "test_rope_head_dim_positions_and_tying_reach_the_flags_and_must_match_"
                     "the_checkpoint")
SCHEDULE = t(TRAINER, "test_kl_estimators_and_schedule")
BUILD_STAGES = t(FILTERS, "test_registry_and_build_from_spec_dicts")
OFFLINE_COST = t(FILTERS, "test_offline_run_artifact_and_cost")
SHAPING = t(FILTERS, "test_reward_shaping_rules")
HTTP_JUDGE = t(REWARDS, "test_http_judge_verdicts_and_key")
EVAL_JOB = t(EVAL, "test_evaluate_before_and_after_greedy_is_deterministic")
EVAL_SAMPLING = t(EVAL, "test_evaluate_samples_at_eval_temperature_and_max_tokens_seeded_by_train_seed")
SFT_JOB = t(EVAL, "test_sft_runs_its_steps_of_its_batch_size_at_its_lr")
# The embedded trainer's AdamW; Megatron's OptimizerConfig from the train.sh flags.
ADAM = {"train:local": t(TRAINER, "test_adam_takes_the_spec_values_and_decays_matrices_only"),
        "train:megatron": t(MARGS, "test_the_optimizer_and_seed_of_the_spec_reach_the_megatron_trainer")}

# The embedded trainer is one process: the Megatron layout does not apply to it; a value
# other than the default is warned about (harmless: nothing is sharded either way).
LOCAL_LAYOUT = "warned:unused_settings"
# The embedded engine has no vLLM memory pool, sequence limit or sharding: warned likewise.
LOCAL_ENGINE = "warned:unused_settings"
# Slurm's request fields on the local scheduler, gpu_memory_gb on CPU runs: warned likewise.
NOT_READ = "warned:unused_settings"
FP8_FLAGS = t(VLLM, "test_fp8_and_the_engine_limits_reach_every_vllm")


EFFECTS: dict[str, dict[str, Evidence]] = {
    # ------------------------------------------------------------------ Spec
    # Job names (`<name>-<job>`, asserted by the dry run) and the run directory under
    # cluster.output_dir (env.sh).
    "Spec.name": {"all": (DRY_RUN, SHELL)},
    "Spec.description": {"all": "doc"},  # free text, shown nowhere a job reads
    "Spec.model": {"all": "section:Model"},
    "Spec.cluster": {"all": "section:Cluster"},
    "Spec.sft": {"all": JOBS_FOLLOW},  # sft=null removes the sft job
    "Spec.train": {"all": "section:Train"},
    "Spec.rollout": {"all": "section:Rollout"},
    "Spec.data": {"all": "section:Data"},
    "Spec.reward": {"all": "section:Reward"},
    # The driver builds its pipeline from the list; filters=[] also drops the screen job.
    "Spec.filters": {"all": (BUILD_STAGES, JOBS_FOLLOW)},
    "Spec.algorithm": {"all": "section:Algorithm"},
    "Spec.router_replay": {"all": "section:RouterReplay"},
    "Spec.system": {"all": "section:System"},
    "Spec.eval": {"all": "section:Eval"},
    "Spec.export": {"all": JOBS_FOLLOW},  # export=null removes the export job
    # ------------------------------------------------------------------ model
    # An HF checkpoint is an external input; a Megatron one gets the to_hf job.
    "Model.checkpoint": {"all": t(BUNDLE, "test_megatron_checkpoint_gets_an_hf_copy_for_the_engines")},
    "Model.checkpoint_format": {
        "train:local": "check:references",  # megatron format refused for the local trainer
        "train:megatron": (t(BUNDLE, "test_megatron_checkpoint_gets_an_hf_copy_for_the_engines"),
                           MCORE_TINY),  # to_hf of a megatron-format checkpoint, bit for bit
    },
    # Read by to_hf (a Megatron checkpoint carries none; required there, used in the Megatron
    # run test); with an HF checkpoint the jobs load the checkpoint's own: another is refused.
    "Model.tokenizer": {"all": ("check:references", MCORE_TINY, "refused:tokenizer")},
    "Model.architecture": {"all": "section:Architecture"},
    # ------------------------------------------------------------------ architecture
    "Architecture.family": {
        # qwen3 → Qwen3Config, llama → LlamaConfig, deepseek_v3 → DeepseekV3Config,
        # glm4_moe → Glm4MoeConfig; refused: a family without (or with) the moe it needs
        "train:local": (CONFIG_MAP, DS_CONFIG, GLM_CONFIG, "refused:embedded_model"),
        "train:megatron": (DS_MCORE, GLM_MCORE, DENSE_MCORE, "refused:megatron_model"),
    },
    "Architecture.num_layers": {"all": (CONFIG_MAP, ARCH_FLAGS, "check:pipeline")},
    "Architecture.hidden_size": {"all": (CONFIG_MAP, ARCH_FLAGS, "check:memory")},
    "Architecture.ffn_hidden_size": {"all": (CONFIG_MAP, "check:attention_tp")},
    "Architecture.num_attention_heads": {"all": (CONFIG_MAP, "check:attention_tp")},
    "Architecture.num_query_groups": {"all": (CONFIG_MAP, "check:attention_tp")},
    # --kv-channels 128 in the golden train.sh (checked against the checkpoint by
    # runtime.megatron.args); head_dim 24 ≠ 64 / 4 built by init (q/k/o widths).
    "Architecture.head_dim": {"all": (GOLDEN, "check:checkpoint_head_dim", INIT_ARCH, ARCH_CKPT)},
    # mla with deepseek_v3 (MLA), gqa with the other families; the other pairs are refused.
    "Architecture.attention": {
        "train:local": (DS_CONFIG, "refused:embedded_model"),
        "train:megatron": (DS_MCORE, "refused:megatron_model"),
    },
    "Architecture.mla": {"train:local": DS_CONFIG, "train:megatron": (DS_MCORE, DS_FLAGS)},
    "Architecture.vocab_size": {"all": (CONFIG_MAP, t(POLICY, "test_config_rejects"))},
    # the checkpoint's config and tokenizer; the embedded engine's context (max_model_len)
    "Architecture.max_position_embeddings": {"all": ("check:run_level", INIT_ARCH, ARCH_CKPT)},
    # other log-probs from the same weights; --rotary-base against the checkpoint (an int:
    # a fractional value is refused on Megatron)
    "Architecture.rope_theta": {"train:local": INIT_ARCH,
                                "train:megatron": (INIT_ARCH, ARCH_CKPT, "refused:megatron_model")},
    "Architecture.tie_embeddings": {
        "train:local": (t(PLAN, "test_tied_embeddings_count_once"), INIT_ARCH,
                        t(TRAINER, "test_a_tied_policy_trains_its_one_embedding_tensor")),
        "train:megatron": (t(PLAN, "test_tied_embeddings_count_once"), ARCH_CKPT,
                           t(MCORE_TRAINER, "test_tied_embeddings_step_matches_embedded_and_"
                                            "publishes_tied"),  # world 1 and PP 2
                           t(MCORE_RUN, "test_a_killed_megatron_run_resumes_from_its_checkpoint")),
    },
    "Architecture.moe": {
        "train:local": (CONFIG_MAP, "refused:embedded_model"),  # no moe section: dense Qwen3
        # no moe section: a GPTModel without MoE layers (qwen3, llama); refused where the
        # family needs the other (qwen3 with moe, qwen3_moe without)
        "train:megatron": (DENSE_MCORE, DENSE_FLAGS, "refused:megatron_model"),
    },
    # glm4_moe: use_qk_norm in the HF config (q_norm built), --qk-layernorm compared with the
    # checkpoint's, the megatron-core model with q/k layernorms equal to HF; other families
    # take only their own (refused otherwise).
    "Architecture.qk_norm": {
        "train:local": (GLM_CONFIG, "refused:embedded_model"),
        "train:megatron": (GLM_FLAGS, GLM_MCORE, "refused:megatron_model"),
    },
    # glm4_moe: the family's 0.5 or the spec's 0.25 in the HF config (rotary_emb of 2 · 2
    # dims) and as --rotary-percent, compared with the checkpoint's (the megatron-core model
    # takes it from there: GPTModel(rotary_percent)); other families refuse it.
    "Architecture.partial_rotary_factor": {
        "train:local": (GLM_CONFIG, "refused:embedded_model"),
        "train:megatron": (GLM_FLAGS, GLM_MCORE, "refused:megatron_model"),
    },
    # q_lora_rank 32 and none (full-rank q_proj) in both tests; the others mapped to the HF
    # config, rendered as --kv-lora-rank … and compared with the checkpoint's.
    "MLA.q_lora_rank": {"train:local": DS_CONFIG, "train:megatron": (DS_MCORE, DS_FLAGS)},
    "MLA.kv_lora_rank": {"train:local": DS_CONFIG, "train:megatron": (DS_MCORE, DS_FLAGS)},
    "MLA.qk_head_dim": {"train:local": DS_CONFIG, "train:megatron": DS_MCORE},
    "MLA.qk_pos_emb_head_dim": {"train:local": DS_CONFIG, "train:megatron": DS_MCORE},
    "MLA.v_head_dim": {"train:local": DS_CONFIG, "train:megatron": (DS_MCORE, DS_FLAGS)},
    "MoE.num_experts": {"all": (CONFIG_MAP, "check:expert_sizes")},
    "MoE.top_k": {"all": (CONFIG_MAP, t(PLAN, "test_routing_ids_are_int16_above_256_experts"))},
    "MoE.expert_ffn_hidden_size": {"all": (CONFIG_MAP, "check:expert_sizes")},
    # softmax for Qwen3-MoE, sigmoid for deepseek_v3 and glm4_moe; the other pairs are refused.
    "MoE.score_function": {"train:local": (t(DEEPSEEK, "test_config_rejects"),
                                           "refused:embedded_model"),
                           "train:megatron": (DS_FLAGS, "refused:megatron_model")},
    # The embedded trainer keeps the bias fixed (refused); Megatron updates it at 1e-3.
    "MoE.expert_bias": {"train:local": "refused:embedded_model",
                        "train:megatron": (DS_FLAGS, t(MCORE_DEEPSEEK,
                                                       "test_the_selection_bias_takes_deepseeks_update"),
                                           "refused:megatron_model")},
    # select_experts(norm_topk_prob=False) gives the unnormalised softmax gates; policy_config
    # passes the field to the HF config (Megatron: --moe-router-pre-softmax from it).
    "MoE.norm_topk_prob": {"all": t(REPLAY, "test_softmax_gate_formula_by_hand")},
    "MoE.shared_experts": {"train:local": (DS_CONFIG, "refused:embedded_model"),
                           "train:megatron": (DS_FLAGS, DS_MCORE, "refused:megatron_model")},
    # DeepSeek-V3's shared MLP is shared_experts × expert width: any other width is refused.
    "MoE.shared_expert_ffn_hidden_size": {"train:local": "refused:embedded_model",
                                          "train:megatron": "refused:megatron_model"},
    # gates · 2.5 (embedded replay by hand, Megatron R3 equal to it), --moe-router-topk-scaling-factor
    "MoE.routed_scaling_factor": {
        "train:local": (DS_CONFIG, t(DEEPSEEK, "test_replay_after_weight_change_keeps_experts_and_router_learns"),
                        "refused:embedded_model"),
        "train:megatron": (DS_FLAGS, DS_R3, "refused:megatron_model")},
    # n_group / topk_group; Megatron's group-limited choice equals HF's (the R3 test's record).
    "MoE.num_groups": {"train:local": (DS_CONFIG, "refused:embedded_model"),
                       "train:megatron": (DS_FLAGS, DS_R3, "refused:megatron_model")},
    "MoE.group_top_k": {"train:local": DS_CONFIG, "train:megatron": (DS_FLAGS, DS_R3)},
    "MoE.first_dense_layers": {"all": (CONFIG_MAP, t(MARGS, "test_unknown_and_malformed_flags_are_one_clear_error"))},
    # Neither trainer adds the auxiliary loss (Megatron builds its routers with coefficient 0).
    "MoE.aux_loss_coeff": {"all": "refused:aux_loss"},
    "MoE.token_dispatcher": {
        "train:local": LOCAL_LAYOUT,  # no dispatcher in one process: warned unless default
        "train:megatron+devices:cpu": "refused:megatron_cpu",  # allgather only on CPU ranks
        # --moe-token-dispatcher-type parsed (MARGS) and built by jobs/train.py; alltoall and
        # allgather steps equal the embedded trainer's on an H200
        "train:megatron+devices:gpu": (t(MARGS, "test_every_flag_of_the_golden_bundles_parses"),
                                       "gpu:conformance"),
    },
    # ------------------------------------------------------------------ cluster
    "Cluster.scheduler": {
        "scheduler:local": t(RUN, "test_run_executes_the_graph_and_resumes"),
        "scheduler:slurm": (DRY_RUN, t(RUN, "test_run_refuses_a_cluster_spec")),
    },
    "Cluster.devices": {
        "train:local": "refused:devices",  # the embedded trainer runs on the CPU
        # CPU ranks: runtime.launch with file rendezvous, gloo
        "train:megatron+devices:cpu": MCORE_TINY,
        # NCCL, this rank's GPU (use_devices): the conformance steps, and the convert, sft,
        # screen and eval jobs through their launch scripts, on an H200
        "train:megatron+devices:gpu": ("gpu:conformance", "gpu:jobs"),
        "rollout:local": "refused:devices",  # the embedded engine runs on the CPU
        # vLLM's CPU build: eager, its worker extension repacks the experts after each reload
        "rollout:vllm+devices:cpu": (t(VLLM_RUN, "test_tiny_rl_steps_against_vllm"),
                                     "refused:vllm_cpu"),
        "rollout:vllm+devices:gpu": DRY_RUN,  # --gpus-per-node asked of Slurm
    },
    # #SBATCH --partition / --account / --qos and the submitit request (dry run asserts them).
    "Cluster.partition": {"scheduler:slurm": (DRY_RUN, "check:cluster_settings"),
                          "scheduler:local": NOT_READ},
    "Cluster.account": {"scheduler:slurm": DRY_RUN, "scheduler:local": NOT_READ},
    "Cluster.qos": {"scheduler:slurm": DRY_RUN, "scheduler:local": NOT_READ},
    "Cluster.gpus_per_node": {
        "train:megatron": (MCORE_TINY, SPLIT_245B, "check:training_grid"),  # ranks per node
        # the embedded engine replicas of the rollout node, one endpoint each
        "train:local": ("check:training_grid",
                        t(BUNDLE, "test_embedded_rollout_replicas_per_node_follow_gpus_per_node")),
    },
    "Cluster.gpu_memory_gb": {
        "devices:gpu": "check:memory",
        "devices:cpu": NOT_READ,  # not compared on CPU runs
    },
    # #SBATCH --cpus-per-task = cpus_per_task × the node task's ranks, srun steps too, and the
    # submitit request; on local the user's value is warned (a local run limits nothing).
    "Cluster.cpus_per_task": {
        "scheduler:slurm": (SLURM_RESOURCES, t(BUNDLE, "test_srun_steps_get_the_cpus_of_the_node_task"),
                            DRY_RUN),
        "scheduler:local": ("warned:cluster_settings", LOCAL_RESOURCES)},
    # #SBATCH --exclusive / --mem (=0 for GPU jobs unless mem_gb) and the submitit request.
    "Cluster.exclusive": {"scheduler:slurm": (SLURM_RESOURCES, DRY_RUN),
                          "scheduler:local": ("warned:cluster_settings", LOCAL_RESOURCES)},
    "Cluster.mem_gb": {"scheduler:slurm": (SLURM_RESOURCES, DRY_RUN),
                       "scheduler:local": ("warned:cluster_settings", LOCAL_RESOURCES)},
    # scheduler:local: submitit's LocalExecutor timeout_min per job (`rlspec submit` and
    # `rlspec run`, which submits locally).
    "Cluster.time_limit": {"scheduler:slurm": DRY_RUN, "scheduler:local": t(
        CLI, "test_a_local_submit_gives_every_job_the_spec_time_limit")},
    # lib.sh's watcher requeues a job before its time limit, at most this many times.
    "Cluster.max_requeues": {"scheduler:slurm": (
        t(SLURM, "test_a_job_near_its_time_limit_requeues_itself_and_goes_on"), GOLDEN),
        "scheduler:local": NOT_READ},
    # srun --container-image / --container-mounts in the golden 245b lib.sh.
    "Cluster.container": {"scheduler:slurm": GOLDEN, "scheduler:local": "refused:container"},
    "Cluster.modules": {"all": SHELL},  # `module load` in env.sh
    "Cluster.env": {"all": SHELL},  # `export` in env.sh
    "Cluster.env_passthrough": {"all": (t(BUNDLE, "test_secrets_stay_out_of_the_bundle"),
                                        t(CLI, "test_submit_names_unset_passthrough_variables_and_never_writes_values"))},
    "Cluster.output_dir": {"scheduler:slurm": SHELL, "scheduler:local":
                           "test:tests/compiler/test_preflight.py::test_rlspec_run_writes_under_cluster_output_dir"},
    "Container.image": {"scheduler:slurm": GOLDEN, "scheduler:local": "refused:container"},
    "Container.mounts": {"scheduler:slurm": GOLDEN, "scheduler:local": "refused:container"},
    # ------------------------------------------------------------------ sft
    # Megatron: --global-batch-size / --lr in jobs/sft/train.sh, the embedded SFT's weights.
    "SFT.steps": {"train:local": SFT_JOB, "train:megatron": MCORE_SFT},
    "SFT.lr": {"train:local": SFT_JOB, "train:megatron": MCORE_SFT},
    "SFT.batch_size": {"train:local": SFT_JOB, "train:megatron": MCORE_SFT},
    # ------------------------------------------------------------------ train
    "Train.backend": {
        "train:local": RL_E2E,
        "train:megatron": MCORE_TINY,
    },
    "Train.nodes": {
        # torchrun --nnodes 16, one node rank per trainer node
        "train:megatron+scheduler:slurm": (SPLIT_245B, "check:training_grid"),
        # the local scheduler starts one trainer task; the embedded trainer is one process
        "train:megatron+scheduler:local": "refused:local_nodes",
        "train:local": "refused:embedded_trainer_nodes",
    },
    "Train.parallelism": {"all": "section:TrainParallelism"},
    "Train.micro_batch_size": {
        "train:local": t(TRAINER, "test_gradient_does_not_depend_on_micro_batch_size"),
        "train:megatron": (OPT_FLAGS, "check:batch_arithmetic"),
    },
    "Train.global_batch_size": {
        "train:local": t(TRAINER, "test_every_response_is_trained_in_near_equal_optimizer_steps"),
        "train:megatron": (OPT_FLAGS, "check:batch_arithmetic"),
    },
    "Train.precision": {
        "train:local": "refused:precision",  # the embedded trainer is float32
        "train:megatron+devices:cpu": "refused:precision",  # float32 forced on the CPU
        # --bf16: bf16 weights, fp32 gradients and master weights (the GPU branch on the CPU);
        # the convert job writes the Megatron checkpoint in bf16 on an H200
        "train:megatron+devices:gpu": ("check:memory", "gpu:jobs",
                                       t(MCORE_PRECISION, "test_the_spec_precision_sets_the_"
                                                          "megatron_train_jobs_dtypes")),
    },
    "Train.recompute": {
        "train:local": "refused:recompute",  # the embedded trainer keeps every activation
        "train:megatron": (t(MCORE_TRAINER, "test_recomputed_activations_replay_the_same_experts"),
                           t(PLAN, "test_full_recompute_keeps_less_than_selective"),
                           t(MCORE_TRAINER, "test_the_spec_recompute_reaches_the_megatron_"
                                            "models_config")),
    },
    "Train.steps": {"all": RL_E2E},  # 3 steps → 3 metrics lines
    "Train.rollout_budget": {"all": t(RL, "test_rl_job_stops_at_the_rollout_budget")},
    # Samples of the evals (and screen) follow it; Megatron's --seed carries it.
    "Train.seed": {"all": (EVAL_SAMPLING, ADAM["train:megatron"])},
    "Train.optimizer": {"all": "section:Optimizer"},
    "Train.checkpoint": {"all": "section:Checkpointing"},
    "TrainParallelism.tensor": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": (MCORE_TINY, "check:attention_tp"),  # "TP 2" in the trainer log
    },
    "TrainParallelism.pipeline": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": (MCORE_PP, "check:pipeline"),  # "PP 2" in the trainer log
    },
    "TrainParallelism.virtual_pipeline": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": ("refused:megatron_layout", "check:pipeline"),
    },
    "TrainParallelism.context": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": (t(MCORE_TRAINER, "test_context_parallel_2_step_matches_embedded"),
                           "check:context_parallel"),
    },
    "TrainParallelism.expert": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": (MCORE_TINY, SPLIT_245B, "check:expert_grid"),  # "EP 2"
    },
    "TrainParallelism.expert_tensor": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": ("refused:megatron_layout", "check:expert_grid"),
    },
    "TrainParallelism.sequence_parallel": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": (MCORE_TINY, "check:sequence_parallel", "warned:sequence_parallel"),
    },
    "TrainParallelism.first_pipeline_stage_layers": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": ("refused:megatron_layout", "check:pipeline"),
    },
    "TrainParallelism.last_pipeline_stage_layers": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": ("refused:megatron_layout", "check:pipeline"),
    },
    "Optimizer.name": {"all": "doc"},  # Literal["adam"]: one value
    # Both trainers take the lr through Trainer._lr → learning_rate (the schedule test varies
    # lr, min_lr and warm-up); Megatron reads --lr back from train.sh (edited in place there).
    "Optimizer.lr": {"train:local": SCHEDULE, "train:megatron": (SCHEDULE, OPT_FLAGS)},
    "Optimizer.min_lr": {"all": SCHEDULE},
    "Optimizer.weight_decay": ADAM,
    "Optimizer.adam_beta1": ADAM,
    "Optimizer.adam_beta2": ADAM,
    "Optimizer.adam_eps": ADAM,
    "Optimizer.clip_grad": {"train:local": t(TRAINER, "test_clip_grad_bounds_the_gradient_norm_of_each_update"),
                            "train:megatron": ADAM["train:megatron"]},
    "Optimizer.warmup_steps": {"all": SCHEDULE},
    # --optimizer-cpu-offload → megatron-core's HybridDeviceOptimizer (CUDA only); the memory
    # estimate moves Adam's moments to the host.
    "Optimizer.cpu_offload": {
        "train:local": "refused:optimizer_offload",  # the embedded trainer has no offload
        "train:megatron+devices:cpu": "refused:optimizer_offload",  # needs CUDA streams
        "train:megatron+devices:gpu": (t(MARGS, "test_optimizer_cpu_offload_reaches_the_megatron_trainer"),
                                       t(PLAN, "test_optimizer_offload_moves_the_moments_to_the_host"),
                                       "check:memory"),
    },
    "Optimizer.offload_fraction": {
        "train:local": "warned:unused_settings",  # cpu_offload is refused there
        "train:megatron": (t(MARGS, "test_optimizer_cpu_offload_reaches_the_megatron_trainer"),
                           t(PLAN, "test_optimizer_offload_moves_the_moments_to_the_host"),
                           "check:memory", "warned:unused_settings"),
    },
    "Optimizer.distributed": {
        "train:local": LOCAL_LAYOUT,
        "train:megatron": (OPT_FLAGS, "check:memory"),  # --use-distributed-optimizer → DDP
    },
    # interval 1 → a checkpoint per step (TrainerProcess.train_batch, shared by both backends)
    "Checkpointing.interval": {"all": MCORE_TINY},
    "Checkpointing.keep": {"train:local": t(TRAINER, "test_the_embedded_trainer_keeps_the_newest_checkpoints"),
                           "train:megatron": MCORE_TINY},
    # ------------------------------------------------------------------ rollout
    "Rollout.engine": {
        "rollout:local": RL_E2E,
        "rollout:vllm": t(VLLM, "test_every_rendered_vllm_flag_is_accepted"),
    },
    "Rollout.nodes": {
        "scheduler:slurm": (SPLIT_245B, "check:rollout_grid"),  # vllm on nodes 0..7
        "scheduler:local": "refused:local_nodes",  # one rollout task on this machine
    },
    # Colocated: the allocation is the trainer's nodes; srun --overlap; vLLM (GPU) started with
    # --enable-sleep-mode, the embedded server with its sleep mode; the driver sleeps the
    # engines from each hand-over to the weight load (a run equal to a disaggregated one).
    "Rollout.placement": {
        "rollout:local": (t(RL, "test_colocated_engines_sleep_through_training_and_resume_after_sigkill"),
                          t(SLURM, "test_a_colocated_rl_job_runs_trainer_and_engine_on_one_node"),
                          t("tests/runtime/test_placement.py",
                            "test_colocated_engines_sleep_then_wake_weights_load_and_wake_the_kv_cache"),
                          "check:colocated_placement"),
        "rollout:vllm+devices:gpu": (
            t(BUNDLE, "test_colocated_rl_job_runs_trainer_and_engines_on_the_same_nodes"),
            t(VLLM, "test_colocated_engines_start_with_vllms_sleep_mode"),
            "check:colocated_placement"),
        "rollout:vllm+devices:cpu": "refused:placement",  # vLLM's CPU build has no sleep mode
    },
    "Rollout.parallelism": {"all": "section:RolloutParallelism"},
    "Rollout.n": {"all": RL_E2E},  # 4 prompts × n 4 = 16 rollouts a step
    "Rollout.prompts_per_step": {"all": (RL_E2E, "check:run_level")},
    # The eval job's max_tokens defaults to it (asserted); --max-model-len via plan.seq_len.
    "Rollout.max_tokens": {"all": (EVAL_JOB, t(ROLLOUT, "test_stop_tokens_eos_and_max_tokens"),
                                   "check:run_level")},
    "Rollout.sampling": {"all": "section:Sampling"},
    # --gpu-memory-utilization in the golden rollout.sh; the rollout memory check.
    "Rollout.gpu_memory_utilization": {
        "rollout:vllm": (GOLDEN, FP8_FLAGS, t(CHECKS, "test_rollout_over_memory")),
        "rollout:local": LOCAL_ENGINE,
    },
    "Rollout.max_num_seqs": {"rollout:vllm": (GOLDEN, FP8_FLAGS),  # --max-num-seqs
                             "rollout:local": LOCAL_ENGINE},
    "Rollout.redundant_experts": {
        "rollout:vllm": "test:tests/vllm_flags/test_vllm_flags.py::test_redundant_experts_enable_vllms_eplb",
        "rollout:local": "check:redundant_experts"},
    # --quantization fp8 (vLLM; the embedded server from the job config): FP8-rounded weights,
    # log-probs those of the rounded model, the gap visible in train_inference_gap; the
    # correction / r3 / tolerance check; FP8 weights in the rollout memory estimate.
    "Rollout.fp8": {
        "rollout:vllm": ("check:memory", "check:fp8_rollout", FP8_FLAGS),
        "rollout:local": (t(FP8, "test_fp8_engine_serves_the_rounded_weights_with_a_bounded_gap"),
                          t(FP8, "test_the_rl_jobs_rollout_server_serves_fp8_from_the_job_config"),
                          t(RUN, "test_fp8_rollouts_run_end_to_end_and_show_in_the_gap"),
                          "check:fp8_rollout"),
    },
    # 2-node replicas of TP 8 × DP 2 (--data-parallel-address, headless second node).
    # On the embedded engine TP·DP only sets the devices a replica claims (warned).
    "RolloutParallelism.tensor": {"rollout:vllm": (SPLIT_245B, "check:rollout_grid"),
                                  "rollout:local": LOCAL_ENGINE},
    "RolloutParallelism.data": {"rollout:vllm": (SPLIT_245B, "check:rollout_grid"),
                                "rollout:local": LOCAL_ENGINE},
    "RolloutParallelism.expert_parallel": {
        "rollout:vllm": (SPLIT_245B, "warned:rollout_grid"),  # --enable-expert-parallel
        "rollout:local": LOCAL_ENGINE,
    },
    # Engine-side sampling (the same completions request reaches vLLM and the embedded engine).
    "Sampling.temperature": {"all": t(ROLLOUT, "test_processed_logprobs_are_the_sampling_distribution")},
    "Sampling.top_p": {"all": t(ROLLOUT, "test_top_p_samples_from_the_renormalised_nucleus")},
    "Sampling.top_k": {"all": t(ROLLOUT, "test_processed_logprobs_are_the_sampling_distribution")},
    # ------------------------------------------------------------------ data
    # A JSONL file: the train split of sft, screen and the driver; data.eval that of the evals.
    "Data.train": {"all": (t(PROMPTS, "test_sft_and_screen_read_a_train_file"),
                           t(PROMPTS, "test_the_driver_reads_the_train_and_eval_files"))},
    "Data.eval": {"all": (t(PROMPTS, "test_eval_before_reads_the_eval_file"),
                          t(PROMPTS, "test_the_driver_reads_the_train_and_eval_files"))},
    # The data job writes train_size / eval_size rows of the generator (counts asserted).
    "Data.generator": {"all": t(DATA, "test_data_and_init_jobs_then_rerun_skips")},
    "Data.prompt_key": {"all": t(TASKS, "test_write_dataset_uses_keys")},
    "Data.answer_key": {"all": t(TASKS, "test_write_dataset_uses_keys")},
    # Longer prompts are dropped by every job that reads prompts (runtime.prompts).
    "Data.max_prompt_tokens": {"all": ("check:run_level",
                                       t(PROMPTS, "test_drop_overlong_counts_tokens"),
                                       t(PROMPTS, "test_sft_and_screen_read_a_train_file"))},
    "Data.shuffle_seed": {"all": t(PROMPTS, "test_the_prompt_order_follows_data_shuffle_seed_not_train_seed")},
    "ArithmeticTask.type": {"all": "doc"},  # Literal["arithmetic"]: one value
    "ArithmeticTask.seed": {"all": t(TASKS, "test_deterministic_and_seed_dependent")},
    "ArithmeticTask.train_size": {"all": (t(TASKS, "test_splits_disjoint_unique_and_sized"),
                                          t(TASKS, "test_eval_split_does_not_depend_on_train_size"))},
    "ArithmeticTask.eval_size": {"all": t(TASKS, "test_splits_disjoint_unique_and_sized")},
    "ArithmeticTask.min_digits": {"all": t(TASKS, "test_space_limits")},
    "ArithmeticTask.max_digits": {"all": t(TASKS, "test_space_limits")},
    "ArithmeticTask.operations": {"all": (t(TASKS, "test_space_limits"),
                                          t(TASKS, "test_answers_are_correct_and_verifier_agrees"))},
    # ------------------------------------------------------------------ reward
    "Reward.verifiers": {"all": t(REWARDS, "test_build_reward_weighted_verifiers")},
    "Reward.judge": {"all": t(REWARDS, "test_build_reward_rule_judge")},
    "Verifier.type": {"all": t(REWARDS, "test_build_reward_weighted_verifiers")},
    "Verifier.weight": {"all": t(REWARDS, "test_build_reward_weighted_verifiers")},
    "Judge.type": {"all": (t(REWARDS, "test_build_reward_rule_judge"),
                           t(REWARDS, "test_build_reward_http_judge"))},
    # The http judge's settings: ignored by a rule judge, neither warned nor refused.
    "Judge.max_parse_failure_rate": {"all": "test:tests/runtime/test_rewards.py::test_judge_parse_failures_are_counted_and_stop_past_the_threshold"},
    "Judge.url": {"all": (t(REWARDS, "test_build_reward_http_judge"), "warned:references")},
    "Judge.model": {"all": (HTTP_JUDGE, "warned:references")},
    "Judge.api_key_env": {"all": (HTTP_JUDGE, "check:references", "warned:references")},
    "Judge.tie_margin": {"all": (t(REWARDS, "test_rule_judge_tie_margin_boundary"), "warned:references")},
    "Judge.timeout_s": {"all": (t(REWARDS, "test_http_judge_errors"), "warned:references")},
    # ------------------------------------------------------------------ filters (ZVE)
    "OfflinePassRate.type": {"all": BUILD_STAGES},
    # A path becomes the compiled screen job's external input, and the screen samples with it.
    "OfflinePassRate.proxy_model": {"all": t(EVAL, "test_screen_samples_at_its_temperature_with_its_proxy_model")},
    "OfflinePassRate.samples_per_prompt": {"all": (OFFLINE_COST,
                                                   t(EVAL, "test_screen_drops_exactly_the_prompts_outside_the_range"))},
    "OfflinePassRate.max_pass_rate": {"all": t(FILTERS, "test_offline_boundaries")},
    "OfflinePassRate.min_pass_rate": {"all": (t(FILTERS, "test_offline_boundaries"),
                                              t(EVAL, "test_screen_drops_exactly_the_prompts_outside_the_range"))},
    "OfflinePassRate.proxy_cost_ratio": {"all": OFFLINE_COST},
    "OfflinePassRate.reuse_epochs": {"all": OFFLINE_COST},
    "OfflinePassRate.temperature": {"all": t(EVAL, "test_screen_samples_at_its_temperature_with_its_proxy_model")},
    # Slurm: one task per node, each screening its share of the prompts, merged by task 0.
    "OfflinePassRate.nodes": {
        "scheduler:slurm": t(EVAL, "test_screen_shards_prompts_over_its_nodes"),
        "scheduler:local": "refused:screen_nodes",
    },
    "AdaptiveGroupSize.type": {"all": BUILD_STAGES},
    "AdaptiveGroupSize.extreme_pass_rate": {"all": t(FILTERS, "test_adaptive_extreme_boundaries")},
    "AdaptiveGroupSize.target_mixed_probability": {"all": t(FILTERS, "test_growth_rule_boundaries_and_tie")},
    "AdaptiveGroupSize.max_n": {"all": (t(FILTERS, "test_adaptive_in_pipeline_counts_grown_rollouts"),
                                        "warned:zve_budgets")},
    "AdaptiveGroupSize.budget": {"all": t(FILTERS, "test_adaptive_in_pipeline_counts_grown_rollouts")},
    "RewardShaping.type": {"all": BUILD_STAGES},
    "RewardShaping.scope": {"all": t(FILTERS, "test_reward_shaping_scope_all_and_still_flat")},
    "RewardShaping.length": {"all": "section:LengthPenalty"},
    "RewardShaping.repetition": {"all": "section:RepetitionPenalty"},
    "LengthPenalty.coefficient": {"all": (SHAPING, "warned:zve_budgets")},
    "LengthPenalty.max_tokens": {"all": SHAPING},
    "RepetitionPenalty.ngram": {"all": SHAPING},
    "RepetitionPenalty.coefficient": {"all": (SHAPING, "warned:zve_budgets")},
    "FlatGroups.type": {"all": BUILD_STAGES},
    "FlatGroups.action": {"all": (t(FILTERS, "test_flat_groups_rl_zvp_and_keep"), "check:references")},
    "FlatGroups.oversample": {"all": (t(FILTERS, "test_drop_oversample_refill_and_discard"),
                                      "warned:zve_budgets")},  # warned unless action is drop
    "FlatGroups.max_refills": {"all": (t(FILTERS, "test_drop_refill_limit"), "warned:zve_budgets")},
    "FlatGroups.fallback": {"all": (t(FILTERS, "test_drop_fallbacks_when_pool_runs_dry"),
                                    "check:zve_budgets", "warned:zve_budgets")},
    "History.type": {"all": BUILD_STAGES},
    "History.window": {"all": t(FILTERS, "test_history_skip_and_retry_after_cooldown")},
    "History.cooldown_steps": {"all": t(FILTERS, "test_history_skip_and_retry_after_cooldown")},
    # ------------------------------------------------------------------ algorithm
    # Both trainers compute the loss with runtime.losses.compute_loss(algorithm.loss,
    # algorithm[<loss>]); the parameters of the other losses are warned about.
    "Algorithm.loss": {"all": t(LOSSES, "test_compute_loss_dispatch_and_validation")},
    "Algorithm.espo": {"all": ("section:ESPOParams", "warned:references")},
    "Algorithm.gspo": {"all": ("section:GSPOParams", "warned:references")},
    "Algorithm.grpo": {"all": ("section:GRPOParams", "warned:references")},
    "Algorithm.cispo": {"all": ("section:CISPOParams", "warned:references")},
    "Algorithm.advantage": {"all": "section:Advantage"},
    "Algorithm.kl": {"all": "section:KL"},
    "Algorithm.correction": {"all": "section:Correction"},
    # Trainer.step(epochs=ppo_epochs): 2 epochs take twice the optimizer steps (12, not 6).
    "Algorithm.ppo_epochs": {"all": t(TRAINER, "test_with_two_ppo_epochs_the_schedule_reaches_min_lr_at_the_last_optimizer_step")},
    "ESPOParams.alpha": {"all": t(LOSSES, "test_espo_matches_reference")},
    "ESPOParams.high_entropy_fraction": {"all": t(LOSSES, "test_espo_matches_reference")},
    "GSPOParams.clip_low": {"all": t(LOSSES, "test_gspo_matches_reference")},
    "GSPOParams.clip_high": {"all": t(LOSSES, "test_gspo_matches_reference")},
    "GRPOParams.clip_low": {"all": t(LOSSES, "test_grpo_matches_reference")},
    "GRPOParams.clip_high": {"all": t(LOSSES, "test_grpo_matches_reference")},
    "CISPOParams.eps_high": {"all": t(LOSSES, "test_cispo_matches_reference")},
    "CISPOParams.eps_low": {"all": t(LOSSES, "test_cispo_matches_reference")},
    "Advantage.estimator": {"all": ("check:references",
                                    t(DRIVER, "test_the_trainers_token_advantages_follow_the_estimator"))},
    "Advantage.alpha_zvp": {"all": t(ADV, "test_rl_zvp_matches_reference")},
    "Advantage.eps": {"all": t(ADV, "test_group_advantages_properties")},  # eps=0 vs default
    "KL.coefficient": {
        "train:local": t(RL, "test_kl_to_the_starting_policy_reaches_the_trainer"),
        "train:megatron": MCORE_TINY,  # kl 0.1: the frozen reference GPTModel, kl logged
    },
    "KL.estimator": {"all": SCHEDULE},  # kl_penalty k1 / k2 / k3
    "Correction.mode": {"all": (t(LOSSES, "test_high_entropy_mask_and_correction_match_reference"),
                                t(CHECKS, "test_fp8_rollouts_without_a_train_inference_correction_are_an_error"))},
    "Correction.cap": {"all": t(LOSSES, "test_high_entropy_mask_and_correction_match_reference")},
    "Correction.low": {"all": t(LOSSES, "test_high_entropy_mask_and_correction_match_reference")},
    "Correction.high": {"all": t(LOSSES, "test_high_entropy_mask_and_correction_match_reference")},
    # ------------------------------------------------------------------ router replay
    "RouterReplay.mode": {
        "train:local": (t(TRAINER, "test_r3_replays_engine_routing_and_router_still_learns"),
                        t(TRAINER, "test_r2_and_updates_raise_the_likelihood_of_advantaged_responses"),
                        "refused:dense_replay"),
        # R3: gap < 1e-5; R2 / R3 of GLM-4.5's router; refused on a dense model
        "train:megatron": (MCORE_TINY, t(MCORE_GLM, "test_rl_step_with_router_replay_matches_embedded"),
                           "refused:dense_replay"),
        "rollout:local": RL_E2E,  # --return-routed-experts: train–inference gap < 1e-3
        "rollout:vllm": SPLIT_245B,  # --enable-return-routed-experts
    },
    # ------------------------------------------------------------------ system
    # the trainers' check before each update (both inherit Trainer.step), and against vLLM's
    # CPU build, whose reload without the repack it stops
    "System.weight_sync_tolerance": {"all": (
        t(TRAINER, "test_a_step_stops_before_updating_when_the_engine_serves_other_weights"),
        t(DRIVER, "test_the_weight_sync_probe_stops_a_run_whose_engines_do_not_serve_the_"
                  "trainers_weights"),
        t(VLLM_ENGINE, "test_a_reload_takes_effect_only_with_the_cpu_repack"))},
    "System.reward_overlap": {"all": t(DRIVER, "test_reward_overlap_scores_chunks_while_others_still_generate")},
    # the driver's pool of reward workers (runtime.scoring), whatever the engine or trainer:
    # RLDriver.run makes it, Generation submits each group to it; the http judge through it
    "System.startup_timeout_s": {"all": (
        t(DRIVER, "test_the_driver_waits_for_its_engines_as_long_as_the_spec_says"))},
    "System.reward_workers": {"all": (
        t(DRIVER, "test_reward_workers_score_the_same_groups_as_the_drivers_thread"),
        t(REWARDS, "test_the_driver_step_counts_judge_failures_and_stops_the_run"),
        # more workers than the batch host's task has CPUs (Slurm) is a warning
        "check:cluster_settings",
        t(CHECKS, "test_reward_workers_beyond_the_drivers_cpus_are_warned"))},
    # Trainer._micro_batches, shared by both backends (MegatronTrainer passes it on), and the
    # driver's assignment of groups to the rollout replicas (any engine: the client's endpoints).
    "System.length_balancing": {"all": (
        t(TRAINER, "test_length_balancing_groups_responses_of_similar_length"),
        t(DRIVER, "test_length_balancing_spreads_groups_over_replicas_by_predicted_length"))},
    # the driver's hand-over loop (any engine, any trainer: both inherit Trainer.step's
    # on-policy-only sync check) and the compiler's correction rule
    "System.max_staleness": {"all": (
        t(RL, "test_bounded_staleness_pipelines_steps_and_resumes_after_sigkill"),
        t(TRAINER, "test_a_stale_batch_is_trained_with_its_gap_logged_not_checked"),
        "check:stale_rollouts")},
    # ipc and nccl run on the CPU with the embedded engine (the colocated RL run maps the
    # trainer's shared memory, the resumed RL run receives its broadcast; the server's IPC and
    # NCCL updates), and are refused on GPUs and with vLLM's CPU build; disk = /collective_rpc
    # reload, no --weight-transfer-config.
    "System.weight_sync": {
        "rollout:local": ("refused:weight_sync",
                          t(RL, "test_colocated_engines_sleep_through_training_and_resume_after_sigkill"),
                          t(SHARED, "test_an_ipc_update_serves_exactly_the_shared_weights"),
                          t(RL, "test_rl_job_resumes_after_sigkill"),
                          t(BROADCAST, "test_the_engines_serve_exactly_the_weights_the_trainer_broadcast"),
                          t(SLURM, "test_a_requeued_rl_job_resumes_from_its_last_complete_step")),
        "rollout:vllm": ("refused:weight_sync",
                         t(VLLM, "test_weight_sync_disk_passes_no_transfer_config"),
                         t(ROLLOUT, "test_vllm_disk_reload_through_collective_rpc")),
    },
    # ------------------------------------------------------------------ eval
    "Eval.enabled": {"all": JOBS_FOLLOW},  # enabled=false removes eval_before / eval_after
    "Eval.every_steps": {"all": t(RL, "test_rl_job_stops_at_the_rollout_budget")},
    "Eval.samples": {"all": EVAL_JOB},  # 2 samples per prompt
    "Eval.temperature": {"all": EVAL_SAMPLING},
    "Eval.max_tokens": {"rollout:local": ("check:run_level", EVAL_SAMPLING),
                        "rollout:vllm": ("check:run_level", EVAL_SAMPLING, t(
                            BUNDLE, "test_each_jobs_engines_serve_its_longest_request_and_"
                                    "record_experts_only_for_rl"))},
    # ------------------------------------------------------------------ export
    "Export.format": {"all": "doc"},  # Literal["hf"]: one value
    "Export.dtype": {"all": (t(EVAL, "test_export_converts_dtype_and_keeps_files"),
                             t(EVAL, "test_export_in_fp32_keeps_the_weights_exactly"))},
}

# Fields whose whole purpose is compile time: "check:" alone is their evidence.
COMPILE_TIME: dict[str, str] = {
    "Cluster.gpu_memory_gb": "the memory estimate's capacity; no job reads it",
}

# What is missing, per field (the paths are those whose evidence is "MISSING").
MISSING: dict[str, str] = {}

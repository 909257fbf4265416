"""Job ``sft``: a short supervised cold start before RL (the paper's pipeline starts with SFT).

Teacher-forced next-token training on ``prompt → answer <eos>`` pairs of the train split
(``runtime.prompts.train_file``):

    loss = − (1/N) Σ_{b} Σ_{t ∈ answer_b ∪ {eos}} log π(x_{b,t} | x_{b,<t})

with N the number of answer tokens in the batch, AdamW at ``sft.lr`` for ``sft.steps`` steps
of ``sft.batch_size`` examples drawn with seed ``train.seed``. The result (HF folder) is the
policy RL starts from. Kept short on purpose: RL must have something left to learn.

``train.backend: megatron``: the same loss, batches and optimizer (``spec.models.SFT_OPTIMIZER``)
on the Megatron trainer in the spec's train layout (``runtime.megatron.sft``), one process per
GPU started by ``jobs/sft/train.sh`` with its Megatron-LM flags; each rank reads its own layers
of the HF ``policy_init``, and each pipeline stage writes its layers of the HF ``policy_sft``
(``runtime.megatron.hf_folder``: the model is never whole in one process).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

from runtime.errors import JobError
from runtime.jobs.common import JobContext, run_job


def encode_pairs(tokenizer: Any, rows: Sequence[dict[str, Any]], prompt_key: str,
                 answer_key: str) -> tuple[Any, Any, Any]:
    """Right-padded ids [B, T], attention mask and the mask of answer + eos positions."""
    import torch

    seqs, starts = [], []
    for row in rows:
        prompt = tokenizer.encode(str(row[prompt_key]), add_special_tokens=False)
        answer = tokenizer.encode(str(row[answer_key]), add_special_tokens=False)
        seqs.append(prompt + answer + [tokenizer.eos_token_id])
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.bool)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[b, : len(seq)] = torch.tensor(seq)
        attention[b, : len(seq)] = True
        target[b, start : len(seq)] = True
    return ids, attention, target


def _batches(ctx: JobContext, tokenizer: Any) -> Iterator[tuple[Any, Any, Any]]:
    """``sft.steps`` batches of ``sft.batch_size`` pairs drawn with seed ``train.seed``: the
    same on every rank and on both trainers."""
    import torch

    from runtime.files import read_jsonl
    from runtime.prompts import drop_overlong, train_file

    sft, data = ctx.section("sft"), ctx.section("data")
    rows = list(drop_overlong(dict(enumerate(read_jsonl(train_file(ctx)))), tokenizer, data,
                              ctx.log, "train").values())
    generator = torch.Generator().manual_seed(int(ctx.section("train.seed")))
    for _ in range(int(sft["steps"])):
        index = torch.randint(len(rows), (int(sft["batch_size"]),), generator=generator).tolist()
        yield encode_pairs(tokenizer, [rows[i] for i in index], data["prompt_key"],
                           data["answer_key"])


def _log_step(ctx: JobContext, step: int, steps: int, loss: float) -> None:
    if step % 50 == 0 or step == steps - 1:
        ctx.log.info("step %d/%d: loss %.4f", step + 1, steps, loss)


def run(ctx: JobContext) -> None:
    import torch

    from runtime.devices import job_device
    from runtime.policy import load_policy, save_policy
    from runtime.trainer import sequence_logprobs
    from spec.models import SFT_OPTIMIZER as OPT

    if ctx.model_spec.train.backend == "megatron":
        raise JobError("train.backend is megatron: the SFT runs on the Megatron trainer, "
                       "started with its flags by jobs/sft/train.sh (jobs/sft/launch.sh)")
    device = job_device(ctx.spec)
    steps = int(ctx.section("sft.steps"))
    model, tokenizer = load_policy(ctx.input_path("policy_init"))
    model.to(device)
    torch.manual_seed(int(ctx.section("train.seed")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(ctx.section("sft.lr")),
                                  betas=(OPT["adam_beta1"], OPT["adam_beta2"]),
                                  eps=OPT["adam_eps"], weight_decay=OPT["weight_decay"])
    model.train()
    loss = torch.zeros(())
    for step, (ids, attention, target) in enumerate(_batches(ctx, tokenizer)):
        ids, attention, target = ids.to(device), attention.to(device), target.to(device)
        logp, _ = sequence_logprobs(model, ids, attention)
        loss = -(logp * target).sum() / target.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])
        optimizer.step()
        _log_step(ctx, step, steps, loss.item())
    model.eval().to("cpu")  # saved from host memory
    if ctx.rank == 0:
        save_policy(model, tokenizer, ctx.output_path("policy_sft"), job=ctx.job, steps=steps,
                    final_loss=loss.item())


def run_megatron(ctx: JobContext, flags: Sequence[str]) -> None:
    """``train.backend: megatron``: this rank's share of the SFT (module doc)."""
    from runtime.megatron.args import parse_megatron_args, train_settings
    from runtime.megatron.engine import MegatronTrainer
    from runtime.megatron.hf_folder import load_hf_folder, save_hf_folder
    from runtime.megatron.parallel import destroy_parallel
    from runtime.megatron.setup import build_policy
    from runtime.megatron.sft import sft_batch, sft_step

    if ctx.model_spec.train.backend != "megatron":
        raise JobError(f"Megatron flags given, but train.backend is "
                       f"{ctx.model_spec.train.backend}: the embedded SFT takes only --config")
    args = parse_megatron_args(["--config", str(ctx.config_path), *flags], checkpoints=False)
    init = str(ctx.input_path("policy_init"))
    policy = build_policy(args, ctx.spec["cluster"]["devices"], init, routing_replay=False)
    load_hf_folder(policy.module, policy.hf_config, init)  # this rank's layers only
    if policy.main:
        ctx.log.info("Megatron SFT: %s", policy.describe)
    steps = int(ctx.section("sft.steps"))
    trainer = MegatronTrainer(
        policy.module, algorithm=ctx.spec["algorithm"],
        train=train_settings(args, ctx.spec["train"]), vocab_size=int(policy.hf_config.vocab_size),
        total_optimizer_steps=steps, length_balancing=bool(ctx.section("system.length_balancing")))
    loss = 0.0
    for step, (ids, attention, target) in enumerate(_batches(ctx, policy.tokenizer)):
        loss = sft_step(trainer, sft_batch(ids, attention, target))["loss"]
        if policy.main:
            _log_step(ctx, step, steps, loss)
    # collective: each pipeline stage writes its layers (runtime.megatron.hf_folder)
    save_hf_folder(policy.module, policy.hf_config, policy.tokenizer,
                   ctx.output_path("policy_sft"), job=ctx.job, steps=steps, final_loss=loss)
    # The groups go before the interpreter does: a gloo group left to its destructor at exit
    # can abort the process ("terminate called without an active exception"), a failed job.
    destroy_parallel()


def main(argv: Sequence[str] | None = None) -> int:
    """``--config PATH [--force]``, and with train.backend megatron the Megatron-LM flags of
    ``jobs/sft/train.sh``."""
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--config")
    ap.add_argument("--force", action="store_true")
    known, flags = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if not flags:  # the embedded SFT: run_job parses (and reports errors in) the command line
        return run_job(run, argv, description=__doc__)
    own = (["--config", known.config] if known.config else []) + (["--force"] if known.force else [])
    return run_job(lambda ctx: run_megatron(ctx, flags), own, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

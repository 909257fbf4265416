"""Job ``sft``: a short supervised cold start before RL (the paper's pipeline starts with SFT).

Teacher-forced next-token training on ``prompt → answer <eos>`` pairs of the train split
(``runtime.prompts.train_file``):

    loss = − (1/N) Σ_{b} Σ_{t ∈ answer_b ∪ {eos}} log π(x_{b,t} | x_{b,<t})

with N the number of answer tokens in the batch, AdamW at ``sft.lr`` for ``sft.steps`` steps
of ``sft.batch_size`` examples drawn with seed ``train.seed``. The result (HF folder) is the
policy RL starts from. Kept short on purpose: RL must have something left to learn.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

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


def run(ctx: JobContext) -> None:
    import torch

    from runtime.devices import job_device
    from runtime.files import read_jsonl
    from runtime.policy import load_policy, save_policy
    from runtime.prompts import drop_overlong, train_file
    from runtime.trainer import sequence_logprobs

    device = job_device(ctx.spec)
    sft = ctx.section("sft")
    data = ctx.section("data")
    seed = int(ctx.section("train.seed"))
    model, tokenizer = load_policy(ctx.input_path("policy_init"))
    model.to(device)
    rows = list(drop_overlong(dict(enumerate(read_jsonl(train_file(ctx)))), tokenizer, data,
                              ctx.log, "train").values())
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(sft["lr"]), weight_decay=0.0)
    model.train()
    steps, batch_size = int(sft["steps"]), int(sft["batch_size"])
    for step in range(steps):
        index = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        ids, attention, target = encode_pairs(tokenizer, [rows[i] for i in index],
                                              data["prompt_key"], data["answer_key"])
        ids, attention, target = ids.to(device), attention.to(device), target.to(device)
        logp, _ = sequence_logprobs(model, ids, attention)
        loss = -(logp * target).sum() / target.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            ctx.log.info("step %d/%d: loss %.4f", step + 1, steps, loss.item())
    model.eval().to("cpu")  # saved from host memory
    if ctx.rank == 0:
        save_policy(model, tokenizer, ctx.output_path("policy_sft"), job=ctx.job, steps=steps,
                    final_loss=loss.item())


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

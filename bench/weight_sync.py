"""Weight sync into the embedded engine: ``disk`` against ``ipc`` (shared memory), per load.

Run: ``.venv/bin/python bench/weight_sync.py`` (``--reps N``, ``--sizes tiny,mid,large``).

For each model size (Qwen3-MoE configs built here; nothing is downloaded) one embedded
rollout server runs in its own process, served as the RL job serves it with
``weight_sync: ipc`` (``--weight-transfer-config '{"backend": "ipc"}'``). This process plays
the trainer: it writes a new policy version's HF folder (both modes write it, a resumed run
needs it) and, for ``ipc``, shares its tensors as the embedded trainer does
(``IPCWeightTransfer.publish`` of its ``state_dict``: one segment in ``/dev/shm``, in the
served model's own names, which the engine copies in as they are); then it pushes the version as the driver does: ``disk`` has the engine
read the folder (``DiskWeightTransfer("local")``, the default), ``ipc`` has it map the
segment (``IPCWeightTransfer``, the update body of the folder). Timed: the push (pause →
load → publish the version → resume, the engine's side) and the trainer's extra publish
for ``ipc`` (the segment write). The two modes alternate, in an order that flips every
repetition, against the same server; the result is the ratio of the medians. The engine's
weights are checked after every push (its weight version, and the log-prob of one fixed
sequence against the version's own). Absolute times are context only.

Columns: the medians, their ratio (disk / ipc load) and the ratio with the trainer's
segment write counted (disk / (ipc load + publish)). The last line:
``weight sync: ipc load X.XXx faster than disk, Y.YYx with the trainer's segment write (<size>)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# hidden, layers, experts, expert width: the tiny example's width, then larger
SIZES = {
    "tiny": (128, 2, 8, 64),
    "mid": (512, 4, 16, 256),
    "large": (768, 4, 32, 384),
}


def build(path: Path, size: str, seed: int) -> None:
    import tokenizers
    import torch
    import transformers

    hidden, layers, experts, width = SIZES[size]
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=width, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=hidden // 8, num_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    vocab = {f"<{i}>": i for i in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<1>",
                                         pad_token="<0>").save_pretrained(path)


def main() -> int:
    import torch

    from runtime.policy import load_policy, save_policy
    from runtime.rollout.client import RolloutClient
    from runtime.rollout.shared_weights import remove_segments, segment_path
    from runtime.rollout.weight_transfer import DiskWeightTransfer, IPCWeightTransfer
    from tests.helpers import rollout_servers

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sizes", default="tiny,mid,large")
    args = ap.parse_args()
    torch.set_num_threads(1)
    owner = "bench-weight-sync"
    probe = [5, 9, 12, 40, 41, 42, 7, 3]
    results = []
    print(f"{'size':6} {'params':>9} {'disk load':>10} {'ipc load':>10} {'load ratio':>10} "
          f"{'ipc publish':>11} {'with publish':>12}")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        stack.callback(remove_segments, owner)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        for size in args.sizes.split(","):
            base = Path(tmp) / size
            build(base / "v0", size, seed=0)
            versions = []
            for k in (1, 2):  # two other policies, loaded in turn (a load always changes them)
                build(base / f"w{k}", size, seed=k)
                model, tokenizer = load_policy(base / f"w{k}")
                versions.append((model, tokenizer))
            params = sum(p.numel() for p in versions[0][0].parameters())
            logs = base / "logs"
            logs.mkdir()
            with rollout_servers(base / "v0", logs, 1, "--weight-transfer-config",
                                 '{"backend": "ipc"}') as urls:
                client = RolloutClient(urls, timeout_s=600, retries=0)
                client.wait_ready(timeout=120)
                disk, ipc = DiskWeightTransfer("local"), IPCWeightTransfer()
                times: dict[str, list[float]] = {"disk": [], "ipc": [], "publish": []}
                v = 0
                for rep in range(args.reps + 1):  # the first round warms both up, untimed
                    for mode in (("disk", "ipc") if rep % 2 else ("ipc", "disk")):
                        v += 1
                        model, tokenizer = versions[v % 2]
                        folder = base / "weights" / f"v{v}"
                        save_policy(model, tokenizer, folder)
                        t0 = time.perf_counter()
                        if mode == "ipc":
                            IPCWeightTransfer.publish(folder, model.state_dict().items(),
                                                      segment_path(owner, v))
                        t1 = time.perf_counter()
                        (ipc if mode == "ipc" else disk).push(client, str(v), path=str(folder))
                        t2 = time.perf_counter()
                        assert client.weight_info() == [str(v)]
                        got = client.prompt_logprobs(probe)[0]
                        want = model_logprobs(model, probe)
                        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
                        remove_segments(owner, keep=lambda version, v=v: version >= v)
                        if rep:
                            times[mode].append(t2 - t1)
                            if mode == "ipc":
                                times["publish"].append(t1 - t0)
                client.close()
            d, i = statistics.median(times["disk"]), statistics.median(times["ipc"])
            pub = statistics.median(times["publish"])
            results.append((size, d / i, d / (i + pub)))
            print(f"{size:6} {params / 1e6:8.1f}M {d * 1e3:8.1f}ms {i * 1e3:8.1f}ms "
                  f"{d / i:9.2f}x {pub * 1e3:9.1f}ms {d / (i + pub):11.2f}x")
    size, load, total = results[-1]
    print(f"weight sync: ipc load {load:.2f}x faster than disk, {total:.2f}x with the trainer's "
          f"segment write ({size})")
    return 0


def model_logprobs(model: object, ids: list[int]) -> list[float]:
    """log p(x_t | x_<t) of ``ids`` under the HF ``model`` (the engine's probe, in-process)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()  # type: ignore[operator]
    logp = torch.log_softmax(logits[0, :-1], dim=-1)
    return [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]


if __name__ == "__main__":
    sys.exit(main())

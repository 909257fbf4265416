"""Weight sync into the embedded engine: ``disk`` against ``ipc`` (shared memory) and
``nccl`` (the trainer's broadcast over gloo), per load.

Run: ``.venv/bin/python bench/weight_sync.py`` (``--reps N``, ``--sizes tiny,mid,large``,
``--backends ipc,nccl,nccl-packed``).

For each model size (Qwen3-MoE configs built here; nothing is downloaded) and each backend,
one embedded rollout server runs in its own process, served as the RL job serves it
(``--weight-transfer-config '{"backend": ...}'``; the disk update works on every server).
This process plays the trainer and the driver: it writes a new policy version's HF folder
(every mode writes it, a resumed run needs it) and publishes the version as the embedded
trainer does: ``ipc`` shares its ``state_dict`` (``IPCWeightTransfer.publish``: one segment
in ``/dev/shm``), ``nccl`` hands it to a ``BroadcastSender`` (a copy it holds, on its own
thread); then it pushes the version as the driver does: ``disk`` has the engine read the
folder (``DiskWeightTransfer("local")``), ``ipc`` map the segment (``IPCWeightTransfer``),
``nccl`` receive the sender's broadcast (``BroadcastWeightTransfer``: request, ack, the
engine's ``/update_weights`` while the sender broadcasts, done; through the FileStore), one
broadcast per tensor as the RL job sends them, or (``nccl-packed``) in vLLM's default packed
1 GiB buffers.
Timed: the push (pause → load → publish the version → resume, the engine's side) and the
trainer's publish. Disk and the backend alternate, in an order that flips every repetition,
against the same server; each ratio is of medians measured on one server. The engine's
weights are checked after every push (its weight version, and the log-prob of one fixed
sequence against the version's own). Absolute times are context only.

Columns: the medians, their ratio (disk / backend load) and the ratio with the trainer's
publish counted (disk / (load + publish)). The last line:
``weight sync: ipc load X.XXx faster than disk, Y.YYx with the trainer's segment write
(<size>); nccl load ...``.
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
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sizes", default="tiny,mid,large")
    ap.add_argument("--backends", default="ipc,nccl,nccl-packed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, tuple[str, float, float]] = {}
    print(f"{'size':6} {'params':>9} {'backend':>11} {'disk load':>10} {'its load':>10} "
          f"{'load ratio':>10} {'publish':>9} {'with publish':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        for size in args.sizes.split(","):
            base = Path(tmp) / size
            build(base / "v0", size, seed=0)
            versions = []
            for k in (1, 2):  # two other policies, loaded in turn (a load always changes them)
                build(base / f"w{k}", size, seed=k)
                versions.append(load_policy_of(base / f"w{k}"))
            params = sum(p.numel() for p in versions[0][0].parameters())
            for backend in args.backends.split(","):
                d, b, pub = measure(base, backend, versions, args.reps)
                results[backend] = (size, d / b, d / (b + pub))
                print(f"{size:6} {params / 1e6:8.1f}M {backend:>11} {d * 1e3:8.1f}ms "
                      f"{b * 1e3:8.1f}ms {d / b:9.2f}x {pub * 1e3:7.1f}ms {d / (b + pub):11.2f}x")
    words = {"ipc": "the trainer's segment write", "nccl": "the trainer's copy"}
    print("weight sync: " + "; ".join(
        f"{backend} load {load:.2f}x faster than disk, {total:.2f}x with "
        f"{words[backend.split('-')[0]]} "
        f"({size})" for backend, (size, load, total) in results.items()))
    return 0


def load_policy_of(path: Path) -> tuple[object, object]:
    from runtime.policy import load_policy

    return load_policy(path)


def measure(base: Path, backend: str, versions: list, reps: int) -> tuple[float, float, float]:
    """Medians of the disk load, the ``backend`` load and the trainer's publish for it, against
    one server of that backend (disk updates go to the same server). ``nccl``: one broadcast
    per tensor, as the RL job sends over gloo; ``nccl-packed``: vLLM's default wire format,
    1 GiB buffers."""
    from runtime.policy import save_policy
    from runtime.rollout.broadcast_transfer import BroadcastSender, BroadcastWeightTransfer
    from runtime.rollout.client import RolloutClient
    from runtime.rollout.shared_weights import remove_segments, segment_path
    from runtime.rollout.weight_transfer import DiskWeightTransfer, IPCWeightTransfer
    from tests.helpers import rollout_servers

    owner, probe = "bench-weight-sync", [5, 9, 12, 40, 41, 42, 7, 3]
    logs = base / f"logs-{backend}"
    logs.mkdir()
    served = backend.split("-")[0]
    disk = DiskWeightTransfer("local")
    times: dict[str, list[float]] = {"disk": [], backend: [], "publish": []}
    with ExitStack() as stack:
        urls = stack.enter_context(rollout_servers(
            base / "v0", logs, 1, "--weight-transfer-config", f'{{"backend": "{served}"}}'))
        client = RolloutClient(urls, timeout_s=600, retries=0)
        stack.callback(client.close)
        client.wait_ready(timeout=120)
        if backend == "ipc":
            stack.callback(remove_segments, owner)
            fast: object = IPCWeightTransfer()
        else:
            sender = BroadcastSender(base / f"exchange-{backend}", "127.0.0.1")
            stack.callback(sender.close)
            fast = BroadcastWeightTransfer(base / f"exchange-{backend}", disk,
                                           packed=backend == "nccl-packed")
        v = 0
        for rep in range(reps + 1):  # the first round warms both up, untimed
            for mode in (("disk", backend) if rep % 2 else (backend, "disk")):
                v += 1
                model, tokenizer = versions[v % 2]
                folder = base / f"weights-{backend}" / f"v{v}"
                save_policy(model, tokenizer, folder)
                t0 = time.perf_counter()
                if mode == "ipc":
                    IPCWeightTransfer.publish(folder, model.state_dict().items(),
                                              segment_path(owner, v))
                elif mode != "disk":
                    sender.publish(v, folder, model.state_dict().items())
                t1 = time.perf_counter()
                (disk if mode == "disk" else fast).push(client, str(v), path=str(folder))
                t2 = time.perf_counter()
                assert client.weight_info() == [str(v)]
                got = client.prompt_logprobs(probe)[0]
                want = model_logprobs(model, probe)
                assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
                if served == "ipc":
                    remove_segments(owner, keep=lambda version, v=v: version >= v)
                else:
                    sender.prune(v)
                if rep:
                    times[mode].append(t2 - t1)
                    if mode != "disk":
                        times["publish"].append(t1 - t0)
        if served == "nccl":
            assert dict(fast.routes) == {"broadcast": reps + 1}  # none fell back to disk
    return tuple(statistics.median(times[k]) for k in ("disk", backend, "publish"))


def model_logprobs(model: object, ids: list[int]) -> list[float]:
    """log p(x_t | x_<t) of ``ids`` under the HF ``model`` (the engine's probe, in-process)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()  # type: ignore[operator]
    logp = torch.log_softmax(logits[0, :-1], dim=-1)
    return [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]


if __name__ == "__main__":
    sys.exit(main())

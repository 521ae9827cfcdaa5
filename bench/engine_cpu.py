"""CPU benchmark: a tiny random MPT prefilling a 65,536-token prompt in bounded memory.

Each measurement runs in its own subprocess so the peak RSS (ru_maxrss) belongs to that run alone.
Baselines in the same run: our engine at shorter contexts (memory should grow only by the KV cache)
and HF transformers' MptForCausalLM (eager attention, T x T scores per layer) where it fits.

    python bench/engine_cpu.py [--tokens 4096 16384 65536] [--hf-tokens 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DECODE_STEPS = 16


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prompt_ids(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run_ours(ckpt: Path, n: int, chunk: int, skip: bool = True) -> dict:
    import functools

    from pipeline.engine import prefill_chunked
    from pipeline.engine.attention import AttentionBackend
    from pipeline.engine.backends import blockwise
    from pipeline.engine.load import load

    model, _ = load(ckpt, dtype=torch.float32, max_seq_len=n + DECODE_STEPS)
    if not skip:  # A/B: the exact ALiBi block skipping off
        prefill = functools.partial(blockwise.prefill, skip_negligible=False)
        model.backend = AttentionBackend("blockwise-noskip", prefill, blockwise.decode, "blockwise", "blockwise")
    ids = prompt_ids(n, model.config.vocab_size)
    base = rss_mib()
    cache = model.new_cache(1, n + DECODE_STEPS)
    t0 = time.perf_counter()
    logits = prefill_chunked(model, ids, cache, chunk_size=chunk)
    prefill_s = time.perf_counter() - t0
    positions = torch.tensor([n])
    token = logits.argmax()[None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(DECODE_STEPS):
            token = model.decode(token, cache, positions).argmax(-1)
            positions += 1
    decode_ms = (time.perf_counter() - t0) / DECODE_STEPS * 1e3
    return {
        "impl": "ours" if skip else "ours-noskip",
        "tokens": n,
        "chunk": chunk,
        "prefill_s": prefill_s,
        "decode_ms_per_token": decode_ms,
        "rss_before_mib": base,
        "peak_rss_mib": rss_mib(),
        "kv_cache_mib": cache.nbytes / 2**20,
    }


def run_hf(ckpt: Path, n: int) -> dict:
    from transformers import MptForCausalLM

    model = MptForCausalLM.from_pretrained(ckpt, dtype=torch.float32, max_seq_len=n).eval()
    x = torch.tensor([prompt_ids(n, model.config.vocab_size)])
    base = rss_mib()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(x, logits_to_keep=1)
    return {
        "impl": "hf",
        "tokens": n,
        "prefill_s": time.perf_counter() - t0,
        "rss_before_mib": base,
        "peak_rss_mib": rss_mib(),
    }


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.impl == "hf":
        result = run_hf(args.ckpt, args.n)
    else:
        result = run_ours(args.ckpt, args.n, args.chunk, skip=args.impl == "ours")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--hf-tokens", type=int, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 is fastest for this tiny model on a shared box)")
    parser.add_argument("--noskip-tokens", type=int, nargs="*", default=[],
                        help="also run ours with the exact ALiBi block skipping off at these lengths")
    parser.add_argument("--child", choices=["ours", "ours-noskip", "hf"])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--n", type=int)
    parser.add_argument("--impl")
    args = parser.parse_args()
    if args.child:
        args.impl = args.child
        child(args)
        return
    from pipeline.engine.init_checkpoint import init_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint("tiny", Path(tmp) / "tiny", seed=0)
        runs = [("ours", n) for n in args.tokens] + [("ours-noskip", n) for n in args.noskip_tokens]
        runs += [("hf", n) for n in args.hf_tokens]
        rows = []
        for impl, n in runs:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                impl,
                "--ckpt",
                str(ckpt),
                "--n",
                str(n),
                "--chunk",
                str(args.chunk),
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"impl": impl, "tokens": n, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| impl | tokens | prefill s | decode ms/token | RSS before MiB | peak RSS MiB | KV MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['tokens']} | error: {r['error']} | | | | |")
            continue
        print(
            f"| {r['impl']} | {r['tokens']} | {r['prefill_s']:.2f} | {r.get('decode_ms_per_token', float('nan')):.1f} "
            f"| {r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r.get('kv_cache_mib', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()

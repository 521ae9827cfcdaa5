"""Model commands: `longdoc model init`, `longdoc generate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="MPT checkpoint utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser("init", help="write a random-weight HF-format MPT checkpoint + tokenizer")
    init.add_argument("--preset", choices=("tiny", "mpt-7b-shape"), default="tiny")
    init.add_argument("--out", type=Path, required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--text", type=Path, nargs="*", default=None,
                      help="text files to train the tokenizer on (default: generated text)")
    init.set_defaults(func=_init)

    gen = sub.add_parser("generate", help="complete a prompt with an MPT checkpoint")
    gen.add_argument("--model", default=None, help="checkpoint dir or hub id (default: LONGDOC_MODEL)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    gen.add_argument("--max-seq-len", type=int, default=None, help="raise the checkpoint's max_seq_len")
    gen.add_argument("--decode-mode", choices=("eager", "graph", "compile"), default=None,
                     help="run the dense single-batch path with this decode step (eager, one CUDA graph, "
                          "torch.compile); default: the serving engine")
    gen.set_defaults(func=_generate)


def _init(args: argparse.Namespace) -> int:
    from pipeline.engine.init_checkpoint import init_checkpoint

    out = init_checkpoint(args.preset, args.out, seed=args.seed, text_files=args.text)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from config.settings import get_settings
    from pipeline.engine import DenseGenerator, Generator, SamplingParams
    from pipeline.engine.load import load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    try:  # bad checkpoints, configs and requests end with one clear line, not a traceback
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        model, tokenizer = load(args.model or get_settings().model, device=device, dtype=dtype,
                                max_seq_len=args.max_seq_len)
        # the serving engine by default; an explicit --decode-mode runs the dense single-batch path
        generator = (Generator(model, tokenizer) if args.decode_mode is None
                     else DenseGenerator(model, tokenizer, decode_mode=args.decode_mode))
        (completion,) = generator.generate([args.prompt], params)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError / UnsupportedConfig are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(completion.text)
    return 0

"""`lorakit bench serve`'s command line: --quick sets small defaults that explicit options still override."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.bench import serve_load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit bench serve", description=serve_load.__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long run: a tiny random Llama and a small load (QUICK); options given "
                             "explicitly still win")
    parser.add_argument("--base", default="smollm2-135m",
                        help="embedded model, HF directory, or a Llama config (.json or preset: random weights)")
    parser.add_argument("--methods", nargs="+", choices=serve_load.METHODS, default=list(serve_load.METHODS))
    parser.add_argument("--adapters", type=int, nargs="+", default=None,
                        help="distinct-adapter counts (0 = the base alone); default 0 1 16 128, and 32 on cuda")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the server's and the bound's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (rows of the bound)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="the server's --prefill-tokens")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default: --max-batch)")
    parser.add_argument("--requests", type=int, default=64, help="load requests per scenario and round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probes", type=int, default=4, help="idle TTFT probes per scenario and round")
    parser.add_argument("--prompt-chars", type=int, default=160, help="prompt length in characters, at most")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (and the bound)")
    parser.add_argument("--no-bound", action="store_true", help="skip the decode-step bound")
    parser.add_argument("--out", default="docs", help="where bench_serve.md/.json/.png go")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options with their defaults filled in (counts by device, clients from --max-batch), or exit 2."""
    argv = list(argv)
    parser = build_parser()
    if "--quick" in argv:
        parser.set_defaults(**serve_load.QUICK)
    args = parser.parse_args(argv)
    if args.adapters is None:
        args.adapters = serve_load.default_adapter_counts(args.device)
    args.clients = args.clients or args.max_batch
    if min(args.adapters) < 0 or min(args.clients, args.requests, args.rounds, args.max_tokens, args.prompt_chars,
                                     args.max_batch, args.prefill_tokens) < 1 \
            or args.probes < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--adapters and --probes must be >= 0; --clients, --requests, --rounds, --max-tokens, "
                     "--prompt-chars, --max-batch, --prefill-tokens and --threads >= 1")
    args.methods = list(dict.fromkeys(args.methods))
    args.argv = argv
    return args


def main(argv: Sequence[str] | None = None) -> int:
    serve_load.run(parse_args(sys.argv[1:] if argv is None else argv))
    return 0

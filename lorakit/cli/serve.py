"""`lorakit serve`: an OpenAI-compatible server for one base model and a directory of adapters.

    lorakit serve --base smollm2-135m --adapters ./adapters --port 8000 --budget-mb 64
    lorakit serve --base scripts/configs/tinyllama-1.1b.json --device cuda --dtype bfloat16 --adapters ./adapters
    lorakit serve --adapters s3://bucket/prefix --adapter-cache /var/cache/lorakit   (endpoint: $AWS_ENDPOINT_URL)

Each subdirectory of --adapters is an adapter (as lorakit.io.save_adapter writes it) served under its
directory name; the base itself is served under --base-name (default: the --base name).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from lorakit.cli.common import UsageError

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # lorakit.serve.base_loader.DTYPES (torch not imported for --help)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="lorakit serve", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m",
                        help="embedded model name, HF model directory, or a Llama config (.json, or a preset of "
                             "lorakit.base_models.llama_config) served with random weights and a one-token-per-character "
                             "tokenizer")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="the base model's dtype")
    parser.add_argument("--adapters", default=None,
                        help="directory of adapter subdirectories, or s3://bucket/prefix (an S3-compatible store at "
                             "$AWS_ENDPOINT_URL; adapters are fetched on first use into --adapter-cache)")
    parser.add_argument("--adapter-cache", default=None,
                        help="local cache of adapters from an s3:// --adapters (default: ~/.cache/lorakit/s3/BUCKET/PREFIX)")
    parser.add_argument("--allow-adapter-root", action="append", default=[], metavar="DIR",
                        help="a directory POST /v1/load_lora_adapter may load adapters from by path (repeatable; "
                             "none: loading by path is refused with 403)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--budget-mb", type=float, default=None, help="memory budget for resident adapters (MB)")
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $LORAKIT_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=16, help="rows decoded together at most")
    parser.add_argument("--prefill-tokens", type=int, default=512,
                        help="prompt tokens prefilled per engine step, over all newcomers (longer prompts are "
                             "prefilled in chunks while the running rows keep decoding)")
    parser.add_argument("--compile", action="store_true",
                        help="run decode steps through torch.compile (lorakit.CompiledForward); on CUDA with "
                             "--compile-mode reduce-overhead, captured in CUDA graphs")
    parser.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile mode of --compile (reduce-overhead: CUDA graphs on a GPU)")
    parser.add_argument("--max-tokens-limit", type=int, default=512, help="the largest max_tokens a request may ask")
    parser.add_argument("--max-blend-parts", type=int, default=4,
                        help="the most adapters one request's adapter_blend may mix (default 4)")
    parser.add_argument("--base-name", default=None, help="the model id of the base (no adapter)")
    parser.add_argument("--preload", action="store_true", help="load every adapter at start-up")
    parser.add_argument("--title", default="lorakit", help="title of the chat page")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds running requests may take before they are cut off with "
                             "finish_reason 'shutdown' (default 30)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: glibc keeps freed memory for reuse (faster CPU forwards, resident size stays "
                             "near its peak; lorakit.perf); default: the C library's own behaviour")
    return parser


def base_model_id(base: str) -> str:
    """The model id of the base: a directory's or a config file's name, else what --base says."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path.resolve().name
    return path.stem if path.suffix == ".json" else base


def _cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would call, if there is one."""
    import shutil

    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)),
                None)


def object_store_source(url: str, cache: str | None):
    """The S3 adapter source of `--adapters s3://...` (boto3 is the `s3` extra)."""
    try:
        from lorakit.serve.object_store import S3Adapters, S3Location
    except ImportError as exc:  # pragma: no cover - boto3 missing
        raise UsageError(f"--adapters {url} needs boto3: pip install 'lorakit[s3]' ({exc})") from None
    try:
        where = S3Location.parse(url)
    except ValueError as exc:
        raise UsageError(f"--adapters: {exc}") from None
    cache = cache or str(Path("~/.cache/lorakit/s3").expanduser() / where.bucket / where.prefix)
    return S3Adapters(url, cache)


def build_app(args: argparse.Namespace):
    """Load the base and build the app (separate from running it, for tests and the demo)."""
    from lorakit.serve.app import ServeConfig, create_app, make_server
    from lorakit.serve.base_loader import DeviceUnavailableError, load_serving_base, serving_device
    from lorakit.perf import in_fresh_thread

    remote = args.adapters is not None and args.adapters.startswith("s3://")
    if args.adapters is not None and not remote and not Path(args.adapters).is_dir():
        raise UsageError(f"--adapters {args.adapters} is not a directory (nor an s3:// URL)")
    if args.adapter_cache is not None and not remote:
        raise UsageError("--adapter-cache needs an s3:// --adapters")
    for root in args.allow_adapter_root:
        if not Path(root).is_dir():
            raise UsageError(f"--allow-adapter-root {root} is not a directory")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 0 <= args.drain_timeout < float("inf"):
        raise UsageError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    if args.budget_mb is not None and not 0 <= args.budget_mb < float("inf"):
        raise UsageError(f"--budget-mb must be a number of megabytes >= 0 (0: no budget), got {args.budget_mb}")
    if args.max_tokens_limit < 1:
        raise UsageError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")
    if args.max_blend_parts < 1:
        raise UsageError(f"--max-blend-parts must be >= 1, got {args.max_blend_parts}")
    if args.prefill_tokens < 1:
        raise UsageError(f"--prefill-tokens must be >= 1, got {args.prefill_tokens}")
    if args.compile_mode and not args.compile:
        raise UsageError("--compile-mode needs --compile")
    if args.compile and str(args.device).startswith("cpu") and not _cpp_compiler():
        raise UsageError("--compile on the CPU needs a C++ compiler for torch.compile's code (none found: set CXX "
                         "or install g++), or serve without --compile")
    try:
        device = serving_device(args.device)
    except DeviceUnavailableError as exc:
        raise UsageError(f"--device: {exc}") from None
    # loaded on a thread that ends: the engine's thread then runs the only OpenMP team (lorakit.perf)
    model, tokenizer = in_fresh_thread(load_serving_base, args.base, device, args.dtype)
    budget = int(args.budget_mb * 1024 * 1024) if args.budget_mb else None
    config = ServeConfig(base_name=args.base_name or base_model_id(args.base), api_key=args.api_key or None,
                         max_tokens_limit=args.max_tokens_limit, max_blend_parts=args.max_blend_parts,
                         title=args.title,
                         drain_timeout=args.drain_timeout, adapter_roots=tuple(args.allow_adapter_root))
    sources, directory = (), args.adapters
    if remote:
        sources, directory = (object_store_source(args.adapters, args.adapter_cache),), None
    server = make_server(model, tokenizer, directory, config=config, budget_bytes=budget,
                         max_batch=args.max_batch, prefill_tokens=args.prefill_tokens, compile_decode=args.compile,
                         compile_mode=args.compile_mode, sources=sources)
    if args.preload:
        for name in server.store.available():
            try:
                server.store.load(name)
            except Exception as exc:  # a bad adapter must not keep the others from being served
                print(f"lorakit serve: could not load {name}: {exc}", file=sys.stderr)
    return create_app(server), server


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, drain (at most --drain-timeout seconds), exit 0."""
    args = build_parser().parse_args(argv)
    from lorakit.serve.app import uvicorn_server

    if args.malloc == "keep":
        from lorakit.perf import keep_freed_memory

        keep_freed_memory()
    app, server = build_app(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"lorakit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"lorakit serve: {server.config.base_name} + adapters {server.store.available()} on "
          f"http://{args.host}:{args.port}  (chat page at /, OpenAI API at /v1)", file=sys.stderr)
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM handler that
    # would kill the process (exit -15) after a clean drain, so SIGTERM's handler is a no-op from here on.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn_server(app, server, host=args.host, port=args.port, log_level="warning").run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

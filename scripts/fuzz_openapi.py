"""Fuzz every route of `lorakit serve` against its own /openapi.json with schemathesis (`--checks all`):
each status a route answers must be declared, bodies must match their schemas, invalid input must be
refused with a 4xx, valid input accepted, 405s must carry Allow, and nothing may answer 5xx.

    python scripts/fuzz_openapi.py --max-examples 50 --out fuzz.json

The server: a random tiny Llama (lorakit.base_models.llama_config's "tiny-llama-random", a one-token-per-character
tokenizer) with two adapters in its directory and one allowed adapter root, on 127.0.0.1 (a free port),
no API key. Prints schemathesis's summary; exits with schemathesis's code (0: no failure).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def build_server(workdir: Path):
    import lorakit
    from lorakit.io import save_adapter
    from lorakit.serve.app import ServeConfig, create_app, make_server
    from lorakit.serve.base_loader import load_serving_base

    source, _ = load_serving_base("tiny-llama-random")
    lorakit.attach(source, lorakit.LoraXSConfig(r=4, init_std=0.3), "pirate")
    lorakit.attach(source, lorakit.LoraConfig(r=4), "robot")
    for name in ("pirate", "robot"):
        save_adapter(source, name, workdir / "adapters" / name)
        save_adapter(source, name, workdir / "allowed" / name)
    model, tokenizer = load_serving_base("tiny-llama-random")
    config = ServeConfig(base_name="tiny", max_tokens_limit=8, default_max_tokens=4,
                         adapter_roots=(str(workdir / "allowed"),))
    return create_app(make_server(model, tokenizer, workdir / "adapters", max_batch=8, config=config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=50, help="examples per operation and phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the counts as JSON here")
    args = parser.parse_args(argv)

    from lorakit.serve.app import BackgroundServer

    workdir = Path(tempfile.mkdtemp(prefix="lorakit-fuzz-"))
    with BackgroundServer(build_server(workdir)) as url:
        command = ["schemathesis", "run", f"{url}/openapi.json", "--checks", "all", "--max-examples",
                   str(args.max_examples), "--seed", str(args.seed), "--workers", "1", "--generation-codec", "utf-8",
                   "--report", "junit", "--report-junit-path", str(workdir / "junit.xml")]
        done = subprocess.run(command, capture_output=True, text=True)
    output = done.stdout + done.stderr
    print(output[-8000:])
    junit = (workdir / "junit.xml").read_text() if (workdir / "junit.xml").exists() else ""
    counts = {key: int(value) for key, value in re.findall(r'\b(tests|failures|errors|skipped)="(\d+)"', junit)[:4]}
    cases = re.search(r"(\d+) generated", output)
    result = {"returncode": done.returncode, "junit": counts, "max_examples": args.max_examples, "seed": args.seed,
              "cases_generated": int(cases.group(1)) if cases else None,
              "summary": [line.strip() for line in output.splitlines() if re.search(r"generated|❌|ST\d{3}", line)][-12:]}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())

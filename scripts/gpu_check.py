"""The GPU check: the CUDA tests, then the device speed benchmark, each under its own time limit.

Run from the repository root (scripts/gpu_check.sh sets PYTHONPATH=. and the defaults). Writes into
$OUT (default ./gpu_out): gpu_check.json (everything), gpu_check.md (the summary), pytest.log,
bench.log and bench/bench_speed_device.{json,md}. A part that fails or runs out of time is recorded
and the next part runs; nothing here waits without a limit. Settings (environment variables):

  DEVICE=cuda|cpu        cpu: a dry run of the same code on a tiny model (minutes on a laptop)
  DTYPE=bfloat16         the base model's dtype in the benchmark
  MODEL=...              a Llama config .json or preset (default TinyLlama-1.1B shape; tiny on cpu)
  TESTS_K=...            pytest -k expression (default "cuda"; "cpu and bfloat16" on cpu)
  TESTS=tests            what pytest collects
  TESTS_TIMEOUT=150 BENCH_TIMEOUT=240   seconds per part (defaults 60/120 on cpu); with the 40 s probe
                         and 10 s of kill grace per part they stay inside the shell script's 480 s limit
  QUICK=0|1              bench speed --quick (default 1 on cpu)
  BENCH_ARGS=...         more flags for `lorakit bench speed` (e.g. "--only prefill training")
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

RESULT_LINE = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
COLLECT_ERROR = re.compile(r"^ERROR (\S+\.py)\b")
SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


PROBE_TIMEOUT = 40  # the environment probe (imports torch, reads the GPU): normally seconds
KILL_GRACE = 10  # after a part's limit, what run_part waits for its killed process group


def settings(env: dict[str, str]) -> dict:
    """The check's settings from the environment, with defaults that depend on the device."""
    device = env.get("DEVICE", "cuda")
    cpu = device == "cpu"
    return {"device": device, "dtype": env.get("DTYPE", "bfloat16"),
            "model": env.get("MODEL", "scripts/configs/tiny-llama.json" if cpu else "scripts/configs/tinyllama-1.1b.json"),
            "tests_k": env.get("TESTS_K", "cpu and bfloat16" if cpu else "cuda"),
            "tests": env.get("TESTS", "tests"),
            "tests_timeout": int(env.get("TESTS_TIMEOUT", "60" if cpu else "150")),
            "bench_timeout": int(env.get("BENCH_TIMEOUT", "120" if cpu else "240")),
            "quick": env.get("QUICK", "1" if cpu else "0") == "1",
            "bench_args": shlex.split(env.get("BENCH_ARGS", "")),
            "out": env.get("OUT") or "gpu_out"}


def run_part(command: list[str], log: Path, timeout: int) -> dict:
    """Run `command` with output to `log`; past `timeout` seconds its whole process group is killed."""
    start = time.perf_counter()
    with log.open("w") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, timed_out = proc.returncode, True
    return {"command": shlex.join(command), "rc": rc, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - start, 1), "log": log.name}


def parse_pytest(text: str) -> dict:
    """Counts and failing test ids from `pytest -v -ra` output, complete or cut short by a timeout."""
    outcomes: dict[str, str] = {}
    collection_errors = []
    for line in text.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            outcomes[match.group(1)] = match.group(2)
            continue
        match = COLLECT_ERROR.match(line)
        if match and "::" not in match.group(1):
            collection_errors.append(line[len("ERROR "):].strip())
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    for outcome in outcomes.values():
        counts[outcome.lower()] += 1
    return {**counts, "collection_errors": collection_errors,
            "failed_ids": sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR"))}


def tests_part(s: dict, out: Path) -> dict:
    command = [sys.executable, "-m", "pytest", "-v", "-ra", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "-m", "not slow", "-k", s["tests_k"], *s["tests"].split()]
    part = run_part(command, out / "pytest.log", s["tests_timeout"])
    part.update(parse_pytest((out / "pytest.log").read_text(errors="replace")))
    # pytest: 0 all passed, 1 some failed (or collection errors), 5 nothing selected
    part["ok"] = not part["timed_out"] and part["failed"] == 0 and part["error"] == 0 and part["passed"] > 0
    return part


def bench_part(s: dict, out: Path) -> dict:
    bench_out = out / "bench"
    command = [sys.executable, "-m", "lorakit", "bench", "speed", "--device", s["device"], "--dtype", s["dtype"],
               "--model", s["model"], "--out", str(bench_out), *(["--quick"] if s["quick"] else []), *s["bench_args"]]
    part = run_part(command, out / "bench.log", s["bench_timeout"])
    report_file = bench_out / "bench_speed_device.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}  # rewritten after each scenario
    part["results"] = report.get("results", [])
    part["failures"] = report.get("failures", [])
    part["report"] = {k: report.get(k) for k in ("machine", "model", "dtype", "modules", "adapter_dtype", "sizes")}
    part["ok"] = part["rc"] == 0 and not part["timed_out"] and not part["failures"]
    return part


def environment() -> dict:
    """What the machine offers, read in a child process so a broken CUDA driver cannot stop the check."""
    probe = ("import json, torch, transformers, peft; c = torch.cuda.is_available(); print(json.dumps({"
             "'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': c, "
             "'gpu': torch.cuda.get_device_name(0) if c else None, "
             "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None, "
             "'transformers': transformers.__version__, 'peft': peft.__version__}))")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as err:
        return {"error": f"environment probe failed: {type(err).__name__}: {err}"}


def summary(check: dict) -> str:
    """The markdown summary: environment, test counts and failures, the benchmark table, goals met or not."""
    env, t, b = check["environment"], check["tests"], check["bench"]
    lines = [f"# GPU check ({check['settings']['device']}, {check['seconds']:.0f} s)", "",
             f"Environment: {json.dumps(env)}", "",
             f"## Tests (`-k {check['settings']['tests_k']}`): {t['passed']} passed, {t['failed']} failed, "
             f"{t['error']} errors, {t['skipped']} skipped in {t['seconds']} s"
             + (" — **timed out**" if t["timed_out"] else ""), ""]
    lines += [f"- failed: {i}" for i in t["failed_ids"]]
    lines += [f"- collection error: {e}" for e in t["collection_errors"]]
    lines += ["", f"## Benchmark: {b['command']} ({b['seconds']} s, rc {b['rc']}"
              + (", **timed out**" if b["timed_out"] else "") + ")", ""]
    lines += ["| scenario | measure | lorakit | base | PEFT | / base | / PEFT | goal | met |", "|" + " --- |" * 9]
    for r in b["results"]:
        ratio = (lambda ref: f"{r['ours'] / ref:.3f}×" if ref else "—")
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['scenario']} | {r['measure']} | {r['ours']:.4g} {r['unit']} | "
                     f"{'—' if r['base'] is None else format(r['base'], '.4g')} | "
                     f"{'—' if r['peft'] is None else format(r['peft'], '.4g')} | {ratio(r['base'])} | "
                     f"{ratio(r['peft'])} | {r['goal'] or '—'} | {met} |")
    lines += [""] + [f"- scenario failed: {f['scenario']}: {f['error']}" for f in b["failures"]]
    goals = [r for r in b["results"] if r["met"] is not None]
    lines += ["", f"Goals met: {sum(r['met'] for r in goals)} of {len(goals)}; overall "
              + ("OK" if check["ok"] else "NOT OK"), ""]
    return "\n".join(lines)


def main() -> int:
    s = settings(dict(os.environ))
    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    check = {"settings": s, "environment": environment()}
    print(f"gpu_check: environment {check['environment']}", flush=True)
    check["tests"] = tests_part(s, out)
    (out / "gpu_check.json").write_text(json.dumps(check, indent=1))  # kept if the run is cut short later
    print(f"gpu_check: tests {check['tests']['passed']} passed, {check['tests']['failed']} failed "
          f"({check['tests']['seconds']} s)", flush=True)
    check["bench"] = bench_part(s, out)
    check["seconds"] = round(time.perf_counter() - start, 1)
    check["ok"] = check["tests"]["ok"] and check["bench"]["ok"]
    (out / "gpu_check.json").write_text(json.dumps(check, indent=1))
    text = summary(check)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The report of `lorakit bench serve`: per-scenario figures, the ratios issue 14 asks for, its goals
(met or not, computed from the figures), and the files: bench_serve.md, bench_serve.json, bench_serve.png.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.io.atomic import atomic_write_bytes, atomic_write_json

BASE = "base"  # the method name of the base-only scenario


@dataclass
class Scenario:
    """One kind of traffic: `adapters` distinct adapters of `method` (BASE, 0 adapters: the base model alone)."""

    method: str
    adapters: int
    tokens_per_s: list[float] = field(default_factory=list)  # one per round: load tokens / load wall time
    tokens: list[int] = field(default_factory=list)  # completion tokens of the load requests, one per round
    latencies_s: list[float] = field(default_factory=list)  # every load request of every round
    ttft_idle_s: list[float] = field(default_factory=list)  # probes sent alone to an idle server
    ttft_load_s: list[float] = field(default_factory=list)  # probes sent while the load ran
    engine: list[dict[str, float]] = field(default_factory=list)  # per round: the load's wall and engine seconds

    @property
    def key(self) -> tuple[str, int]:
        return self.method, self.adapters

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        return {"method": self.method, "adapters": self.adapters,
                "tokens_per_s": statistics.median(self.tokens_per_s),
                "rounds": [round(x, 1) for x in self.tokens_per_s],
                "p50_s": quantile(lat, 0.50), "p99_s": quantile(lat, 0.99),
                "ttft_idle_p50_s": quantile(sorted(self.ttft_idle_s), 0.5), "ttft_idle_count": len(self.ttft_idle_s),
                "ttft_load_p50_s": quantile(sorted(self.ttft_load_s), 0.5), "ttft_load_count": len(self.ttft_load_s),
                "requests": len(lat), "completion_tokens": self.tokens, "engine_time": self._engine_time()}

    def _engine_time(self) -> dict[str, float] | None:
        """Medians over rounds of the load's wall time and the server engine's time in decode and prefill."""
        if not self.engine:
            return None
        rounds = [e | {"outside_s": e.get("window_s", e["wall_s"]) - e["decode_s"] - e["prefill_s"]}
                  for e in self.engine]  # per round: a median of differences, not a difference of medians
        return {k: statistics.median(e[k] for e in rounds) for k in rounds[0]}


def quantile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics; None for no values."""
    if not sorted_values:
        return None
    position = q * (len(sorted_values) - 1)
    lo = int(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


# -- ratios and goals --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    """A target of issue 14: figure `numerator / denominator` (scenario keys, or "bound") ≥ `target`."""

    text: str
    numerator: tuple[str, int]
    denominator: tuple[str, int] | str  # a scenario key, or "bound" (the decode-step bound)
    target: float
    device: str | None  # the device type the goal is about (None: any)


GOALS = [
    Goal("CPU: 1 LoRA-XS adapter vs base only", ("lora_xs", 1), (BASE, 0), 0.90, "cpu"),
    Goal("CPU: 1 LoRA adapter vs base only", ("lora", 1), (BASE, 0), 0.90, "cpu"),
    Goal("128 distinct LoRA-XS vs 1 LoRA-XS adapter", ("lora_xs", 128), ("lora_xs", 1), 0.95, None),
    Goal("base only vs the engine's decode-step bound", (BASE, 0), "bound", 0.70, None),
    Goal("GPU: 128 distinct LoRA-XS vs base only", ("lora_xs", 128), (BASE, 0), 0.85, "cuda"),
    Goal("GPU: 32 distinct LoRA vs base only", ("lora", 32), (BASE, 0), 0.75, "cuda"),
]


def _label(key: tuple[str, int] | str) -> str:
    if key == "bound":
        return "decode-step bound"
    method, n = key
    return "base only" if method == BASE else f"{n} {method}"


def prefill_ceiling(summary: dict, bound: dict | None) -> float | None:
    """The highest tokens/s over the decode-step bound that this scenario's load could reach with the bound's
    forwards: its tokens decoded at the bound, plus the prompt tokens the server prefilled during the load
    (probes included) at the bound's prefill seconds per token. Below 1 wherever prefill costs time; None
    when the run lacks a figure."""
    counters = summary.get("engine_time") or {}
    if bound is None or "prefill_s_per_token" not in bound or "prompt_tokens" not in counters:
        return None
    tokens = statistics.median(summary["completion_tokens"])
    decode_s = tokens / bound["tokens_per_s"]
    return decode_s / (decode_s + counters["prompt_tokens"] * bound["prefill_s_per_token"])


def evaluate_goals(summaries: list[dict], bound: dict | None, device: str) -> list[dict]:
    """Each goal with its figure and whether it is met; None where this run cannot tell (another device,
    a scenario not run), with the reason. A goal against the decode-step bound notes the prefill-inclusive
    ceiling of its load: the part of the gap that is prefill, which no engine overhead explains."""
    by_key = {(s["method"], s["adapters"]): s for s in summaries}
    tps = {key: s["tokens_per_s"] for key, s in by_key.items()}
    if bound is not None:
        tps["bound"] = bound["tokens_per_s"]
    out = []
    for goal in GOALS:
        row = {"goal": goal.text, "target": goal.target, "figure": None, "met": None, "note": ""}
        missing = [_label(k) for k in (goal.numerator, goal.denominator) if k not in tps]
        if missing:
            row["note"] = f"not measured: {', '.join(missing)} not in this run"
        else:
            row["figure"] = tps[goal.numerator] / tps[goal.denominator]
            if goal.device is not None and goal.device != device:
                row["note"] = f"a {goal.device.upper()} goal; this run is on {device}"
            else:
                row["met"] = row["figure"] >= goal.target
            ceiling = prefill_ceiling(by_key[goal.numerator], bound) if goal.denominator == "bound" else None
            if ceiling is not None:
                row["ceiling"] = ceiling
                row["note"] = "; ".join(filter(None, [row["note"], f"prefill-inclusive ceiling {ceiling:.2f}×"]))
        out.append(row)
    return out


def add_ratios(summaries: list[dict]) -> None:
    """vs_base (tokens/s over base only's) and vs_one_adapter (over the same method's 1-adapter scenario)."""
    tps = {(s["method"], s["adapters"]): s["tokens_per_s"] for s in summaries}
    for s in summaries:
        base = tps.get((BASE, 0))
        one = tps.get((s["method"], 1))
        s["vs_base"] = s["tokens_per_s"] / base if base else None
        s["vs_one_adapter"] = s["tokens_per_s"] / one if one and s["method"] != BASE else None


# -- rendering -----------------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _setup(meta: dict, command: str) -> str:
    files = ", ".join(f"{m} r=16, {b / 1e3:.0f} KB file" for m, b in meta["adapter_bytes"].items())
    return (f"Command: `{command}`. Server: `lorakit serve --preload --max-batch {meta['max_batch']} "
            f"--prefill-tokens {meta['prefill_tokens']} --device {meta['device']} --dtype {meta['dtype']}` in its "
            f"own process, base {meta['base']}; {meta['adapters_per_method']} adapters of each method ({files}) on "
            f"every linear layer, all resident. Load: {meta['clients']} concurrent clients, {meta['requests']} "
            f"requests per scenario, {meta['max_tokens']} tokens each (greedy, ignore_eos; request i names adapter "
            f"i mod n), {meta['rounds']} interleaved round(s); tokens/s is the median over rounds of the load's "
            f"completion tokens / its wall time; latencies (sent → answered) are pooled over rounds. "
            f"Machine: {meta['machine']}.")


def _ttft(meta: dict) -> str:
    return (f"TTFT is measured on probes: streamed requests of 1 token (max_tokens=1), time from sending to the "
            f"first streamed chunk. *Idle*: before each scenario's load in each round, {meta['probes']} probes are "
            f"sent one at a time, each once the server reports no running or waiting request (/health), so none "
            f"waits behind a batch. *Under load*: during the load, probes are sent one after another (each after "
            f"the previous answered) from the load's start to its last answer; they queue like any newcomer behind "
            f"the {meta['clients']} clients' requests (max batch {meta['max_batch']}). Probe tokens are not counted "
            f"in tokens/s.")


def _bound(bound: dict, meta: dict) -> str:
    synced = ", CUDA-synchronised" if meta["device"].startswith("cuda") else ""
    return (f"Decode-step bound: the engine's decode step (`Engine.decode_forward`, the model's forward of one "
            f"token per row through the batch's KV cache) of the base at {bound['rows']} rows, no adapters, "
            f"measured in the benchmark's own process after the server stopped: {bound['prompt_tokens']}-token "
            f"prompts, {bound['steps']} steps timed (median {bound['step_s'] * 1e3:.2f} ms{synced}), so at most "
            f"**{bound['tokens_per_s']:.1f} tokens/s**; the whole engine step (with sampling and bookkeeping) "
            f"took {bound['engine_step_s'] * 1e3:.2f} ms on average."
            + (f" Its prefill steps (the {bound['rows']} prompts in one forward) took "
               f"{bound['prefill_s_per_token'] * 1e3:.3f} ms per prompt token: a load's *prefill-inclusive "
               f"ceiling* is its tokens at the bound plus the prompt tokens the server prefilled during it (probes "
               f"included) at that price, the most any engine running these forwards could reach."
               if "prefill_s_per_token" in bound else ""))


def _engine_time(summaries: list[dict], bound: dict | None) -> list[str]:
    """Where each load's wall time went, from the server's own counters: the gap to the decode-step bound."""
    rows = [s for s in summaries if s.get("engine_time")]
    if not rows:
        return []
    lines = ["Where a load's wall time went (the server's /metrics counters read just before each load's first "
             "request and right after its last answer; medians over rounds; load probes included): *decode* is the "
             "engine's decode steps, *prefill* its prefill steps (prompt forwards and first tokens), *outside* the "
             "rest of that window (HTTP, tokenizing, waiting for requests, the engine's loop). *Decode only* is the "
             "load's tokens over its decode seconds. *Ceiling* is the load's prefill-inclusive ceiling over the "
             "decode-step bound, and *reached* its tokens/s over that ceiling.", "",
             "| traffic | wall s | decode s (steps) | prefill s (steps, prompt tokens) | outside s | "
             "decode only tokens/s | ceiling | reached |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        t = s["engine_time"]
        label = "base only" if s["method"] == BASE else f"{s['adapters']} distinct {s['method']}"
        if t["decode_s"] <= 0:
            lines.append(f"| {label} | - | - | - | - | - | - | - |")
            continue
        tokens = statistics.median(s["completion_tokens"])
        ceiling = prefill_ceiling(s, bound)
        reached = s["tokens_per_s"] / (ceiling * bound["tokens_per_s"]) if ceiling else None
        prompt = f", {t['prompt_tokens']:.0f}" if "prompt_tokens" in t else ""
        lines.append(f"| {label} | {t['wall_s']:.2f} | {t['decode_s']:.2f} ({t['decode_steps']:.0f}) | "
                     f"{t['prefill_s']:.2f} ({t['prefill_steps']:.0f}{prompt}) | {t['outside_s']:.2f} | "
                     f"{tokens / t['decode_s']:.1f} | {_num(ceiling, suffix='×')} | {_num(reached, suffix='×')} |")
    return lines + [""]


def render(summaries: list[dict], goals: list[dict], bound: dict | None, meta: dict, command: str) -> str:
    header = ("| traffic | tokens/s (median) | vs base only | vs 1 adapter | p50 latency s | p99 latency s | "
              "TTFT idle p50 s | TTFT under load p50 s | requests |")
    lines = [_setup(meta, command), "", _ttft(meta), "", header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        label = "base only" if s["method"] == BASE else f"{s['adapters']} distinct {s['method']}"
        lines.append(f"| {label} | {s['tokens_per_s']:.1f} | {_num(s['vs_base'], suffix='×')} | "
                     f"{_num(s['vs_one_adapter'], suffix='×')} | {_num(s['p50_s'])} | {_num(s['p99_s'])} | "
                     f"{_num(s['ttft_idle_p50_s'], 3)} (n={s['ttft_idle_count']}) | "
                     f"{_num(s['ttft_load_p50_s'], 3)} (n={s['ttft_load_count']}) | {s['requests']} |")
    lines.append("")
    if bound is not None:
        lines += [_bound(bound, meta), ""]
    lines += _engine_time(summaries, bound)
    lines += ["Goals (issue 14), computed from the figures above:", "",
              "| goal | figure | target | met |", "|---|---:|---:|---|"]
    for g in goals:
        met = "n/a" if g["met"] is None else ("**met**" if g["met"] else "**not met**")
        note = f" ({g['note']})" if g["note"] else ""
        lines.append(f"| {g['goal']} | {_num(g['figure'], suffix='×')} | ≥ {g['target']:.2f}× | {met}{note} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def write_report(summaries: list[dict], goals: list[dict], bound: dict | None, meta: dict, out: Path,
                 command: str) -> str:
    """Write bench_serve.json/.md/.png under `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_serve.json", {"scenarios": summaries, "goals": goals, "decode_bound": bound,
                                                "meta": meta, "command": command})
    text = render(summaries, goals, bound, meta, command)
    atomic_write_bytes(out / "bench_serve.md", text.encode("utf-8"))
    plot(summaries, bound, meta, out / "bench_serve.png")
    return text


def plot(summaries: list[dict], bound: dict | None, meta: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in sorted({s["method"] for s in summaries} - {BASE}):
        points = sorted((s["adapters"], s["tokens_per_s"]) for s in summaries if s["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{method} adapters")
    base = next((s for s in summaries if s["method"] == BASE), None)
    if base:
        ax.axhline(base["tokens_per_s"], color="gray", ls="--", label="base model, no adapter")
    if bound:
        ax.axhline(bound["tokens_per_s"], color="black", ls=":", label=f"decode-step bound ({bound['rows']} rows)")
    ax.set_xscale("log")
    ax.set_xlabel("distinct adapters in the traffic (log scale)")
    ax.set_ylabel("completion tokens / s")
    ax.set_title(f"lorakit serve on {meta['device']}, {meta['clients']} concurrent clients")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())

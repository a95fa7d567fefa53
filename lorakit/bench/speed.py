"""`lorakit bench speed`: lorakit vs the base model vs PEFT on identical settings, in one run.

SmolLM2-135M, adapters on every linear layer (210 modules), LoRA r=16 (α=32) with the very same
weights loaded into lorakit and PEFT, and LoRA-XS r=16 (packed bank; PEFT has no LoRA-XS). Every
scenario interleaves its cases round by round and reports medians; ratios come from the same run.
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

import lorakit
from lorakit.versions import check_version
from lorakit.model.bank import add_packed_lora_xs, ensure_lora_xs_bases
from lorakit.bench import train_step
from lorakit.base_models.llama_config import is_config_spec
from lorakit.model.prefix_hook import cache_argument
from lorakit.bench.timing import interleaved, per_call
from lorakit.io.atomic import atomic_write_bytes, atomic_write_json
from lorakit.perf import keep_freed_memory

RANK = 16


@dataclass
class Result:
    """One line of the report: a measure, our figure, and the references it is compared with."""

    measure: str
    unit: str
    ours: float
    base: float | None = None
    peft: float | None = None
    goal: str = ""
    met: bool | None = None


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _random_ids(rows: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (rows, seq), generator=torch.Generator().manual_seed(seed))


class Setup:
    """Two copies of the base: one carries lorakit adapters, the other PEFT's, with equal weights."""

    def __init__(self, model_name: str, n_lora: int, n_xs: int) -> None:
        from lorakit.base_models.load import load_base

        self.ours, self.tokenizer = load_base(model_name)
        peft_base, _ = load_base(model_name)
        gen = torch.Generator().manual_seed(0)
        self.lora_names = [f"l{i}" for i in range(n_lora)]
        for name in tqdm(self.lora_names, desc="lorakit: attach LoRA adapters", leave=False):
            lorakit.attach(self.ours, lorakit.LoraConfig(r=RANK, lora_alpha=2 * RANK), name)
        with torch.no_grad():
            for layer in lorakit.adapted_layers(self.ours).values():
                for adapter in layer.adapters.values():
                    adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 1e-3)
        self.peft = self._peft_copy(peft_base)
        targets = lorakit.find_targets(self.ours, lorakit.LoraXSConfig(r=RANK))
        ensure_lora_xs_bases(self.ours, targets, RANK)
        self.xs_names = [f"x{i}" for i in range(n_xs)]
        config = lorakit.LoraXSConfig(r=RANK)
        for name in tqdm(self.xs_names, desc="lorakit: pack LoRA-XS adapters", leave=False):
            add_packed_lora_xs(self.ours, name, config,
                               {t: torch.randn(RANK, RANK, generator=gen) * 1e-3 for t in targets})
        self.n_modules = len(targets)

    def _peft_copy(self, base: torch.nn.Module) -> torch.nn.Module:
        import peft
        check_version("peft")

        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
        model = peft.get_peft_model(base, config, adapter_name=self.lora_names[0])
        for name in tqdm(self.lora_names[1:], desc="PEFT: add LoRA adapters", leave=False):
            model.add_adapter(name, config)
        inner = model.base_model.model
        with torch.no_grad():
            for module_name, layer in lorakit.adapted_layers(self.ours).items():
                target = inner.get_submodule(module_name)
                for name in self.lora_names:
                    target.lora_A[name].weight.copy_(layer.adapters[name].lora_A)
                    target.lora_B[name].weight.copy_(layer.adapters[name].lora_B)
        model.eval()
        return model

    def check_same_outputs(self) -> float:
        """Max |logit difference| between lorakit and PEFT for one adapter: they must agree."""
        ids = _random_ids(2, 16, 1)
        with torch.inference_mode():
            with lorakit.use_adapter(self.ours, "l1"):
                ours = self.ours(input_ids=ids).logits
            self.peft.set_adapter("l1")
            theirs = self.peft(input_ids=ids).logits
        return float((ours - theirs).abs().max())


def bench_prefill(s: Setup, repeats: int) -> list[Result]:
    ids = _random_ids(8, 128, 2)
    s.peft.set_adapter("l0")
    with torch.inference_mode():
        def base():
            with lorakit.disable_adapters(s.ours):
                s.ours(input_ids=ids)

        def ours_lora():
            with lorakit.use_adapter(s.ours, "l0"):
                s.ours(input_ids=ids)

        def ours_xs():
            with lorakit.use_adapter(s.ours, "x0"):
                s.ours(input_ids=ids)

        t = interleaved({"base": base, "ours": ours_lora, "xs": ours_xs, "peft": lambda: s.peft(input_ids=ids)},
                        repeats)
    return [Result("unmerged LoRA forward, prefill 8×128", "s", t["ours"], t["base"], t["peft"], "≤ 1.06× base",
                   t["ours"] / t["base"] <= 1.06),
            Result("unmerged LoRA-XS forward, prefill 8×128", "s", t["xs"], t["base"], None, "", None)]


def bench_mixed(s: Setup, counts: list[int], seq: int, repeats: int) -> tuple[list[Result], dict]:
    """Batches of n rows, each row its own adapter."""
    results, curve = [], {"n": [], "ours_lora": [], "peft_lora": [], "ours_xs": []}
    goals = {8: ("lora", 1.10), 32: ("lora", 1.15), 64: ("xs", 1.06)}
    for n in tqdm(counts, desc="mixed batches", leave=False):
        ids = _random_ids(n, seq, 3)
        cases = {}
        with torch.inference_mode():
            def base():
                with lorakit.disable_adapters(s.ours):
                    s.ours(input_ids=ids)

            cases["base"] = base
            if n <= len(s.lora_names):
                lora_rows = [s.lora_names[i] for i in range(n)]

                def ours_lora():
                    with lorakit.use_adapter(s.ours, lora_rows):
                        s.ours(input_ids=ids)

                cases["ours_lora"] = ours_lora
                cases["peft_lora"] = lambda: s.peft(input_ids=ids, adapter_names=lora_rows)
            if n <= len(s.xs_names):
                xs_rows = [s.xs_names[i] for i in range(n)]

                def ours_xs():
                    with lorakit.use_adapter(s.ours, xs_rows):
                        s.ours(input_ids=ids)

                cases["ours_xs"] = ours_xs
            t = interleaved(cases, repeats)
        curve["n"].append(n)
        for key in ("ours_lora", "peft_lora", "ours_xs"):
            curve[key].append(t[key] / t["base"] if key in t else None)
        if "ours_lora" in t:
            goal, met = "", None
            if n in goals and goals[n][0] == "lora":
                limit = goals[n][1]
                goal = f"≤ {limit:.2f}× base" + (" and ≤ 0.5× PEFT" if n == 32 else "")
                met = t["ours_lora"] / t["base"] <= limit and (n != 32 or t["ours_lora"] <= 0.5 * t["peft_lora"])
            results.append(Result(f"{n} rows × {seq} tokens, {n} distinct LoRA adapters", "s", t["ours_lora"],
                                  t["base"], t["peft_lora"], goal, met))
        if "ours_xs" in t:
            goal, met = "", None
            if n in goals and goals[n][0] == "xs":
                goal, met = f"≤ {goals[n][1]:.2f}× base", t["ours_xs"] / t["base"] <= goals[n][1]
            results.append(Result(f"{n} rows × {seq} tokens, {n} distinct LoRA-XS adapters", "s", t["ours_xs"],
                                  t["base"], None, goal, met))
    return results, curve


def bench_blend(s: Setup, rows: int, seq: int, repeats: int) -> list[Result]:
    """`rows` rows, each its own blend of two adapters ({a_i: 0.6, a_i+1: 0.4}) against each its own single
    adapter: a LoRA-XS blend is one core per row (the goal: within 5% of distinct singles); a LoRA blend adds
    both deltas (two passes)."""
    ids = _random_ids(rows, seq, 4)
    cases = {}

    def routed(route):
        def case():
            with lorakit.use_adapter(s.ours, route):
                s.ours(input_ids=ids)
        return case

    xs, lora = s.xs_names, s.lora_names
    cases["base"] = routed(None)
    cases["xs_single"] = routed([xs[i % len(xs)] for i in range(rows)])
    cases["xs_blend"] = routed([{xs[i % len(xs)]: 0.6, xs[(i + 1) % len(xs)]: 0.4} for i in range(rows)])
    cases["lora_single"] = routed([lora[i % len(lora)] for i in range(rows)])
    cases["lora_blend"] = routed([{lora[i % len(lora)]: 0.6, lora[(i + 1) % len(lora)]: 0.4} for i in range(rows)])
    with torch.inference_mode():
        t = interleaved(cases, repeats)
    shape = f"{rows} rows × {seq} tokens"
    return [
        Result(f"{shape}, {rows} distinct LoRA-XS adapters", "s", t["xs_single"], t["base"], None, "", None),
        Result(f"{shape}, {rows} distinct LoRA-XS blends of 2 (vs distinct single LoRA-XS: "
               f"{t['xs_blend'] / t['xs_single']:.3f}×)", "s", t["xs_blend"], t["base"], None,
               "≤ 1.05× distinct single LoRA-XS", t["xs_blend"] <= 1.05 * t["xs_single"]),
        Result(f"{shape}, {rows} distinct LoRA adapters", "s", t["lora_single"], t["base"], None, "", None),
        Result(f"{shape}, {rows} distinct LoRA blends of 2 (vs distinct single LoRA: "
               f"{t['lora_blend'] / t['lora_single']:.3f}×)", "s", t["lora_blend"], t["base"], None, "", None),
    ]


def bench_decode(s: Setup, rows: int, repeats: int) -> list[Result]:
    """One decode step (1 new token per row, KV cache of 32 tokens) with every row on its own adapter."""
    prompt = _random_ids(rows, 32, 4)
    step_ids = _random_ids(rows, 1, 5)
    lora_rows, xs_rows = s.lora_names[:rows], s.xs_names[:rows]

    def make_case(model, route, **kwargs):
        cache_arg = cache_argument(inspect.signature(model.forward).parameters)
        with torch.inference_mode(), route():
            cache = model(input_ids=prompt, use_cache=True, **kwargs).past_key_values

        def step():
            with torch.inference_mode(), route():
                model(input_ids=step_ids, use_cache=True, **{cache_arg: cache}, **kwargs)
        return step

    class _Null:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def kept(model, names):
        """One route for every step, as `generate` inside one use_adapter block and the server's engine do."""
        with lorakit.use_adapter(model, names) as route:
            pass
        return lambda: lorakit.use_route(model, route)

    cases = {"base": make_case(s.ours, lambda: lorakit.disable_adapters(s.ours)),
             "ours_lora": make_case(s.ours, lambda: lorakit.use_adapter(s.ours, lora_rows)),
             "ours_lora_kept": make_case(s.ours, kept(s.ours, lora_rows)),
             "peft_lora": make_case(s.peft, _Null, adapter_names=lora_rows)}
    if len(xs_rows) == rows:
        cases["ours_xs"] = make_case(s.ours, lambda: lorakit.use_adapter(s.ours, xs_rows))
    t = interleaved(cases, repeats)
    out = [Result(f"decode step, {rows} rows × {rows} distinct LoRA adapters (route kept across steps)", "ms",
                  t["ours_lora_kept"] * 1e3, t["base"] * 1e3, t["peft_lora"] * 1e3, "≤ 1.25× base decode",
                  t["ours_lora_kept"] / t["base"] <= 1.25),
           Result(f"decode step, {rows} rows × {rows} distinct LoRA adapters (a new route every step)", "ms",
                  t["ours_lora"] * 1e3, t["base"] * 1e3, t["peft_lora"] * 1e3, "", None)]
    if "ours_xs" in t:
        out.append(Result(f"decode step, {rows} rows × {rows} distinct LoRA-XS adapters", "ms", t["ours_xs"] * 1e3,
                          t["base"] * 1e3, None, "", None))
    return out


def bench_switch(s: Setup) -> list[Result]:
    def ours():
        with lorakit.use_adapter(s.ours, "l1"):
            pass

    names = iter(s.lora_names[:2] * 1000)
    ours_s = per_call(ours, 10000)
    peft_s = per_call(lambda: s.peft.set_adapter(next(names)), 10, repeats=3)
    return [Result("choosing the adapter for a call", "µs", ours_s * 1e6, None, peft_s * 1e6, "≤ 50 µs",
                   ours_s * 1e6 <= 50)]


def bench_merged_swap(s: Setup, repeats: int) -> list[Result]:
    lorakit.merge(s.ours, "l0")
    state = {"ours": "l0", "peft": "l0"}
    s.peft.set_adapter("l0")
    s.peft.merge_adapter()

    def ours_swap():
        new = "l1" if state["ours"] == "l0" else "l0"
        lorakit.swap_merged(s.ours, state["ours"], new)
        state["ours"] = new

    def ours_two_pass():
        new = "l1" if state["ours"] == "l0" else "l0"
        lorakit.unmerge(s.ours, state["ours"])
        lorakit.merge(s.ours, new)
        state["ours"] = new

    def peft_swap():
        new = "l1" if state["peft"] == "l0" else "l0"
        s.peft.unmerge_adapter()
        s.peft.set_adapter(new)
        s.peft.merge_adapter()
        state["peft"] = new

    t = interleaved({"ours": ours_swap, "two_pass": ours_two_pass, "peft": peft_swap}, repeats)
    lorakit.unmerge(s.ours, state["ours"])
    s.peft.unmerge_adapter()
    return [Result("merged swap (unmerge + merge), all layers", "ms", t["ours"] * 1e3, None, t["peft"] * 1e3,
                   "≤ 0.6× PEFT", t["ours"] <= 0.6 * t["peft"]),
            Result("merged swap as unmerge then merge (two passes)", "ms", t["two_pass"] * 1e3, None,
                   t["peft"] * 1e3, "", None)]


def bench_load(s: Setup, repeats: int) -> list[Result]:
    """Adapter files from disk into the live model, other adapters untouched."""
    from lorakit.io import load_adapter, save_adapter

    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    lorakit.attach(s.ours, lorakit.LoraXSConfig(r=RANK, init_std=1e-3), "xs_file")
    save_adapter(s.ours, "xs_file", tmp / "xs")
    save_adapter(s.ours, "l0", tmp / "lora")
    lorakit.delete_adapter(s.ours, "xs_file")
    counter = {"n": 0}

    def fresh() -> str:
        counter["n"] += 1
        return f"load{counter['n']}"

    def ours_xs_packed():
        name = fresh()
        load_adapter(s.ours, tmp / "xs", name, packed=True)
        lorakit.delete_adapter(s.ours, name)

    def ours_xs_modules():
        name = fresh()
        load_adapter(s.ours, tmp / "xs", name)
        lorakit.delete_adapter(s.ours, name)

    def ours_lora():
        name = fresh()
        load_adapter(s.ours, tmp / "lora", name)
        lorakit.delete_adapter(s.ours, name)

    def peft_lora():
        name = fresh()
        s.peft.load_adapter(str(tmp / "lora"), adapter_name=name)
        s.peft.delete_adapter(name)

    # deletion is inside each timed call for all cases alike; time the load alone for the headline
    t = interleaved({"xs_packed": ours_xs_packed, "xs_modules": ours_xs_modules, "lora": ours_lora,
                     "peft": peft_lora}, repeats)
    load_only = []
    for _ in range(repeats):
        name = fresh()
        start = time.perf_counter()
        load_adapter(s.ours, tmp / "xs", name, packed=True)
        load_only.append(time.perf_counter() - start)
        lorakit.delete_adapter(s.ours, name)
    load_only.sort()
    xs_ms = load_only[len(load_only) // 2] * 1e3
    return [Result("LoRA-XS adapter load from disk (packed)", "ms", xs_ms, None, None, "≤ 5 ms", xs_ms <= 5),
            Result("LoRA-XS load + delete, packed", "ms", t["xs_packed"] * 1e3),
            Result("LoRA-XS load + delete, as trainable modules", "ms", t["xs_modules"] * 1e3),
            Result("LoRA adapter load + delete", "ms", t["lora"] * 1e3, None, t["peft"] * 1e3, "", None)]


def bench_training(model_name: str, repeats: int, malloc: str = "default") -> list[Result]:
    """Each configuration in a fresh process (so peak memory is its own, with this run's malloc mode),
    alternating, medians."""
    runs: dict[str, list[dict]] = {"ours": [], "peft": [], "ours_xs": []}
    commands = {"ours": ["--impl", "ours"], "peft": ["--impl", "peft"],
                "ours_xs": ["--impl", "ours", "--method", "lora_xs"]}
    for _ in tqdm(range(repeats), desc="training steps (subprocesses)", leave=False):
        for key, extra in commands.items():
            out = subprocess.run([sys.executable, *train_step.COMMAND, "--model", model_name, "--malloc", malloc,
                                  *extra],
                                 capture_output=True, text=True, check=True)
            runs[key].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def med(key: str, field: str) -> float:
        values = sorted(r[field] for r in runs[key])
        return values[len(values) // 2]

    return [Result("LoRA training step (4×128), time", "s", med("ours", "step_s"), None, med("peft", "step_s"),
                   "≤ 0.9× PEFT", med("ours", "step_s") <= 0.9 * med("peft", "step_s")),
            Result("LoRA training step (4×128), peak memory above model", "MiB", med("ours", "peak_mib"), None,
                   med("peft", "peak_mib"), "≤ 1.0× PEFT", med("ours", "peak_mib") <= med("peft", "peak_mib")),
            Result("LoRA-XS training step (4×128), time", "s", med("ours_xs", "step_s")),
            Result("LoRA-XS training step (4×128), peak memory above model", "MiB", med("ours_xs", "peak_mib"))]


def bench_resident(model_name: str, n_packed: int) -> list[Result]:
    """Memory per resident adapter, on a fresh base model."""
    from lorakit.base_models.load import load_base

    model, _ = load_base(model_name)
    targets = lorakit.find_targets(model, lorakit.LoraXSConfig(r=8))
    ensure_lora_xs_bases(model, targets, 8)
    config = lorakit.LoraXSConfig(r=8)
    add_packed_lora_xs(model, "warm", config, {t: torch.zeros(8, 8) for t in targets})
    bank = model.lorakit_bank
    before = bank.nbytes()
    cores = {t: torch.zeros(8, 8) for t in targets}
    for i in tqdm(range(n_packed), desc=f"pack {n_packed} LoRA-XS adapters", leave=False):
        add_packed_lora_xs(model, f"p{i}", config, cores)
    # Tensor bytes, not RSS deltas: the allocator hands back memory freed by earlier scenarios without the
    # process growing, which made RSS deltas read 0 (a false pass) in a full run.
    packed = bank.nbytes() - before
    for i in range(8):
        lorakit.attach(model, lorakit.LoraXSConfig(r=8), f"m{i}")
    modules = sum(p.numel() * p.element_size() for i in range(8)
                  for p in lorakit.adapter_parameters(model, f"m{i}")) / 8
    for i in range(4):
        lorakit.attach(model, lorakit.LoraConfig(r=16), f"lora{i}")
    lora = sum(p.numel() * p.element_size() for i in range(4)
               for p in lorakit.adapter_parameters(model, f"lora{i}")) / 4
    del model
    gc.collect()
    return [Result(f"{n_packed:,} LoRA-XS r=8 adapters resident (packed)", "MiB", packed / 2**20, None, None,
                   "≤ 1 GiB" if n_packed >= 10000 else "", packed <= 2**30 if n_packed >= 10000 else None),
            Result("memory per resident LoRA-XS r=8 adapter, packed", "KiB", packed / n_packed / 1024),
            Result("memory per resident LoRA-XS r=8 adapter, as trainable modules", "KiB", modules / 1024),
            Result("memory per resident LoRA r=16 adapter", "KiB", lora / 1024)]


def plot_curve(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = {"ours_lora": "lorakit LoRA r=16", "peft_lora": "PEFT LoRA r=16", "ours_xs": "lorakit LoRA-XS r=16"}
    for key, label in labels.items():
        points = [(n, v) for n, v in zip(curve["n"], curve[key]) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the batch (one row each)")
    ax.set_ylabel("forward time / base model forward")
    ax.set_title("Mixed-adapter batches on SmolLM2-135M (CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description(malloc: str = "default") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    check_version("peft")
    import transformers

    return (f"{cpu}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"lorakit {lorakit.__version__}; malloc: "
            + ("freed memory kept for reuse (lorakit.perf.keep_freed_memory)" if malloc == "keep" else "glibc default"))


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} {unit}" if value < 10 else f"{value:,.1f} {unit}"


def render(results: list[Result], command: str, machine: str, agreement: float, seconds: float,
           failures: list[str] = ()) -> str:
    lines = ["| measure | lorakit | base | PEFT | lorakit / base | lorakit / PEFT | goal | met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        vs_base = f"{r.ours / r.base:.3f}×" if r.base else "—"
        vs_peft = f"{r.ours / r.peft:.3f}×" if r.peft else "—"
        met = "—" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.measure} | {_fmt(r.ours, r.unit)} | {_fmt(r.base, r.unit)} | {_fmt(r.peft, r.unit)} | "
                     f"{vs_base} | {vs_peft} | {r.goal or '—'} | {met} |")
    return "\n".join([
        f"Command: `{command}` ({seconds / 60:.1f} min)", "",
        f"Machine: {machine}", "",
        f"lorakit and PEFT carried the same LoRA weights (max |logit difference| {agreement:.2e}).", "",
        *lines, "", *(f"- scenario failed: {f}" for f in failures), ""])


def run(args: Any) -> list[Result]:
    """Every scenario in turn; the report is rewritten after each one, and a failing scenario is reported
    (with its error) instead of losing the figures of the others.

    `args` holds the options of `lorakit bench speed` (lorakit.cli.bench_speed): model, quick, repeats, counts,
    seq, out, only, malloc, and argv (the command line, written into the report)."""
    torch.manual_seed(0)
    malloc = "keep" if getattr(args, "malloc", "keep") == "keep" and keep_freed_memory() else "default"
    start = time.perf_counter()
    full = not args.quick
    counts = sorted(set(args.counts)) if getattr(args, "counts", None) else [1, 8, 32, 64, 128] if full else [1, 8, 32]
    repeats = args.repeats or (5 if full else 3)
    only = set(args.only or SCENARIOS)
    needs_setup = bool(only & {"prefill", "mixed", "blend", "decode", "switch", "merged-swap", "load"})
    n_lora = max(32, max(counts)) if "mixed" in only else 32
    setup = Setup(args.model, n_lora=n_lora, n_xs=max(32, max(counts))) if needs_setup else None
    agreement = setup.check_same_outputs() if setup else float("nan")
    if agreement > 1e-3:
        raise RuntimeError(f"lorakit and PEFT disagree by {agreement} on the same adapter: the comparison is unfair")
    steps = {"prefill": lambda: bench_prefill(setup, repeats),
             "mixed": lambda: bench_mixed(setup, counts, args.seq, max(3, repeats - 2)),
             "blend": lambda: bench_blend(setup, 32, args.seq, max(3, repeats - 2)),
             "decode": lambda: bench_decode(setup, 32, repeats * 2),
             "switch": lambda: bench_switch(setup),
             "merged-swap": lambda: bench_merged_swap(setup, repeats),
             "load": lambda: bench_load(setup, repeats * 2),
             "training": lambda: bench_training(args.model, 3 if full else 1, malloc),
             "resident": lambda: bench_resident(args.model, 10000 if full else 1000)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["lorakit bench speed", *getattr(args, "argv", [])])  # every flag changes the figures
    results: list[Result] = []
    failures: list[str] = []
    for label in tqdm([k for k in SCENARIOS if k in only], desc="bench speed"):
        if label == "training" and setup is not None:
            setup = None  # free the 128-adapter models before the training subprocesses measure memory
            gc.collect()
        try:
            out = steps[label]()
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' figures
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            print(f"lorakit bench speed: scenario {label} failed: {exc}", file=sys.stderr)
            continue
        if label == "mixed":
            out, curve = out
            plot_curve(curve, out_dir / "bench_speed_mixed.png")
        results += out
        report = render(results, command, machine_description(malloc), agreement, time.perf_counter() - start, failures)
        atomic_write_json(out_dir / "bench_speed.json", [asdict(r) for r in results])
        atomic_write_bytes(out_dir / "bench_speed.md", report.encode("utf-8"))
    report = render(results, command, machine_description(malloc), agreement, time.perf_counter() - start, failures)
    atomic_write_bytes(out_dir / "bench_speed.md", report.encode("utf-8"))
    print(report)
    return results


SCENARIOS = ("prefill", "mixed", "blend", "decode", "switch", "merged-swap", "load", "training", "resident")


def wants_device_benchmark(device: str | None, dtype: str | None, model: str) -> bool:
    """--device, --dtype or a Llama config as the model select the device benchmark; otherwise the CPU one."""
    return device is not None or dtype is not None or is_config_spec(model)

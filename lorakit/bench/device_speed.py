"""`lorakit bench speed --device D --dtype T --model CONFIG`: lorakit vs the base vs PEFT on a device and dtype.

The GPU scenarios of issues 12 and 13, on a Llama-shaped model with random weights (see llama_config):
LoRA r=16 (α=32) on all 7 projections with the very same weights in lorakit and PEFT, and packed
LoRA-XS r=16. Every scenario interleaves its cases round by round, synchronises CUDA around each
timed call, and reports medians; ratios to the base come from the same run. A scenario that fails
(a core bug on this device or dtype) is recorded with its error, and the next one runs.
"""

from __future__ import annotations

import copy
import gc
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.model.bank import add_packed_lora_xs, ensure_lora_xs_bases
from lorakit.base_models.llama_config import build_llama, is_config_spec, read_config
from lorakit.bench.timing import interleaved
from lorakit.io import load_adapter, save_adapter
from lorakit.io.atomic import atomic_write_bytes, atomic_write_json
from lorakit.versions import check_version

RANK = 16
# Goals and short scenarios first: if a time limit stops the run, the report (rewritten after each) keeps them.
DEVICE_SCENARIOS = ("bases", "agreement", "xs-check", "prefill", "prefill-mixed", "prefill-xs", "training",
                    "decode-mixed", "decode-xs", "decode-resident")


@dataclass(frozen=True)
class Sizes:
    """Batch shapes of one run: FULL are the issues' figures, QUICK a seconds-long dry run of the same code."""

    prefill: tuple[int, int]  # rows × tokens, one LoRA adapter
    mixed: tuple[int, int]  # rows × tokens, one distinct adapter per row
    prompt: int  # prompt tokens before decoding
    new_tokens: int  # tokens generated per row in the decode scenarios
    peft_tokens: int  # tokens PEFT generates in the mixed decode (it took 63 s for 64 tokens on an H100)
    resident: int  # LoRA-XS adapters resident in the bank for the last decode scenario
    resident_rows: int  # rows (each a distinct adapter) decoded with `resident` adapters resident
    train: tuple[int, int]  # rows × tokens of a training step
    repeats: int  # timed rounds per scenario (decode scenarios use fewer, see `decode_repeats`)
    lora_adapters: int  # LoRA adapters attached to lorakit's and PEFT's copies (rows cycle through them)

    @property
    def decode_repeats(self) -> int:
        return max(1, min(self.repeats, 3))


FULL = Sizes(prefill=(8, 512), mixed=(32, 128), prompt=32, new_tokens=64, peft_tokens=4, resident=1024,
             resident_rows=64, train=(4, 512), repeats=5, lora_adapters=32)
QUICK = Sizes(prefill=(2, 32), mixed=(4, 16), prompt=8, new_tokens=4, peft_tokens=2, resident=16, resident_rows=8,
              train=(2, 32), repeats=2, lora_adapters=4)


@dataclass
class Measure:
    """One line of the report: our figure, the base's and PEFT's in the same run, and the goal if there is one."""

    scenario: str
    measure: str
    unit: str
    ours: float
    base: float | None = None
    peft: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` made to finish its device work before returning, so wall-clock timing measures the kernels too."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        torch.cuda.synchronize(device)
        fn()
        torch.cuda.synchronize(device)
    return call


def timed(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Interleaved medians (seconds) of CUDA-synchronised calls."""
    return interleaved({k: synced(fn, device) for k, fn in cases.items()}, repeats)


class Bench:
    """lorakit's copy of the base with LoRA adapters (and LoRA-XS on demand), PEFT's copy with equal weights."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, sizes: Sizes) -> None:
        self.spec, self.device, self.dtype, self.sizes = spec, device, dtype, sizes
        self.config = read_config(spec) if is_config_spec(spec) else None
        reference = self._fresh(torch.float32)  # the fp32 reference PEFT is compared with
        self.vocab = reference.config.vocab_size
        self.ours = copy.deepcopy(reference).to(dtype)
        peft_base = copy.deepcopy(reference).to(dtype)
        self.lora_names = [f"l{i}" for i in range(max(2, sizes.lora_adapters))]
        for name in self.lora_names:
            lorakit.attach(self.ours, lorakit.LoraConfig(r=RANK, lora_alpha=2 * RANK), name)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # fresh B is zero: give every adapter a visible effect
            for layer in lorakit.adapted_layers(self.ours).values():
                for adapter in layer.adapters.values():
                    adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.02)
        self.n_modules = len(lorakit.adapted_layers(self.ours))
        self.adapter_dtype = str(next(iter(lorakit.adapter_parameters(self.ours, "l0"))).dtype).replace("torch.", "")
        self.agreement_ids = self.ids(2, 64, seed=1)
        with torch.inference_mode():
            self.reference_base_logits = reference(input_ids=self.agreement_ids).logits.float()
        self.reference_logits = self._peft_logits(reference, ["l1"], self.agreement_ids)
        del reference
        self._free()
        self.peft = self._peft_copy(peft_base, self.lora_names)
        self.xs_names: list[str] = []
        self.bases_s: float | None = None

    def _fresh(self, dtype: torch.dtype) -> torch.nn.Module:
        if self.config is not None:
            return build_llama(self.config, self.device, dtype)
        from lorakit.base_models.load import load_base

        model, _ = load_base(self.spec, dtype=dtype)
        return model.to(self.device)

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def ids(self, rows: int, seq: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab, (rows, seq), generator=gen).to(self.device)

    def _peft_copy(self, base: torch.nn.Module, names: list[str]) -> torch.nn.Module:
        """PEFT LoRA on `base` with, for each name, the same A and B as lorakit's adapter of that name."""
        import peft
        check_version("peft")

        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
        model = peft.get_peft_model(base, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        inner = model.base_model.model
        with torch.no_grad():
            for module_name, layer in lorakit.adapted_layers(self.ours).items():
                target = inner.get_submodule(module_name)
                for name in names:
                    target.lora_A[name].weight.copy_(layer.adapters[name].lora_A)
                    target.lora_B[name].weight.copy_(layer.adapters[name].lora_B)
        return model.eval()

    def _peft_logits(self, base: torch.nn.Module, names: list[str], ids: torch.Tensor) -> torch.Tensor:
        model = self._peft_copy(base, names)
        with torch.inference_mode():
            return model(input_ids=ids).logits.float()

    def ensure_xs(self, count: int) -> None:
        """LoRA-XS bases on every adapted module (timed, the first time), then `count` packed adapters."""
        targets = list(lorakit.adapted_layers(self.ours))
        if self.bases_s is None:
            start = time.perf_counter()
            ensure_lora_xs_bases(self.ours, targets, RANK)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.bases_s = time.perf_counter() - start
        config = lorakit.LoraXSConfig(r=RANK)
        gen = torch.Generator(self.device).manual_seed(len(self.xs_names))
        while len(self.xs_names) < count:
            name = f"x{len(self.xs_names)}"
            cores = torch.randn((len(targets), RANK, RANK), generator=gen, device=self.device) * 1e-2  # (modules, r, r)
            add_packed_lora_xs(self.ours, name, config, dict(zip(targets, cores)))
            self.xs_names.append(name)

    # ---------------------------------------------------------------------------------------- helpers
    def forward_cases(self, ids: torch.Tensor, ours_names, peft_names=None) -> dict[str, Callable[[], object]]:
        """base / ours (/ PEFT) forward passes over `ids`; names: one adapter or one per row."""
        def base():
            with torch.inference_mode(), lorakit.disable_adapters(self.ours):
                self.ours(input_ids=ids)

        def ours():
            with torch.inference_mode(), lorakit.use_adapter(self.ours, ours_names):
                self.ours(input_ids=ids)

        cases = {"base": base, "ours": ours}
        if peft_names is not None:
            def peft_forward():
                with torch.inference_mode():
                    if isinstance(peft_names, str):
                        self.peft.set_adapter(peft_names)
                        self.peft(input_ids=ids)
                    else:
                        self.peft(input_ids=ids, adapter_names=list(peft_names))
            cases["peft"] = peft_forward
        return cases

    def generate_case(self, model: torch.nn.Module, ids: torch.Tensor, tokens: int, route=None,
                      **kwargs) -> Callable[[], object]:
        """`generate` of exactly `tokens` greedy tokens per row, under `route` (a context-manager factory)."""
        def call() -> None:
            with torch.inference_mode(), (route() if route else _nothing()):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                     min_new_tokens=tokens, do_sample=False, **kwargs)
            if out.shape[1] != ids.shape[1] + tokens:
                raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, expected {tokens}")
        return call


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return False


# ------------------------------------------------------------------------------------------ scenarios
def bench_bases(b: Bench) -> list[Measure]:
    b.ensure_xs(0)
    on_gpu = b.device.type == "cuda"
    return [Measure("bases", f"LoRA-XS bases (SVD, r={RANK}) for {b.n_modules} modules, once", "s", b.bases_s,
                    goal="≤ 3 s on GPU" if on_gpu else "", met=b.bases_s <= 3 if on_gpu else None,
                    note="one timing: the bases are computed once per model")]


def bench_agreement(b: Bench) -> list[Measure]:
    """lorakit vs PEFT in this dtype, against PEFT's own distance from its fp32 result (same weights)."""
    ids = b.agreement_ids
    with torch.inference_mode():
        with lorakit.use_adapter(b.ours, "l1"):
            ours = b.ours(input_ids=ids).logits.float()
        b.peft.set_adapter("l1")
        theirs = b.peft(input_ids=ids).logits.float()
    ours_vs_peft = float((ours - theirs).abs().max())
    peft_own = float((theirs - b.reference_logits).abs().max())
    ours_vs_fp32 = float((ours - b.reference_logits).abs().max())
    limit = max(peft_own, 1e-4)  # in float32 PEFT's own difference is 0: allow fp32 rounding
    return [Measure("agreement", f"max |logit difference| vs PEFT, same LoRA weights, {_name(b.dtype)}", "",
                    ours_vs_peft, None, peft_own, f"≤ PEFT's own {_name(b.dtype)}-vs-fp32 difference",
                    ours_vs_peft <= limit,
                    note=f"PEFT column: PEFT {_name(b.dtype)} vs PEFT fp32; lorakit vs PEFT fp32: {ours_vs_fp32:.3e}")]


def bench_xs_check(b: Bench) -> list[Measure]:
    """LoRA-XS on this device and dtype: attach, save, load packed, and a mixed batch [module, packed, base]
    equal row by row to each alone, within the base's own rounding in this dtype (its distance from fp32)."""
    b.ensure_xs(0)
    lorakit.attach(b.ours, lorakit.LoraXSConfig(r=RANK, init_std=1e-2), "xs_module")
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
            save_adapter(b.ours, "xs_module", tmp)
            start = time.perf_counter()
            load_adapter(b.ours, tmp, "xs_packed", packed=True)
            if b.device.type == "cuda":
                torch.cuda.synchronize(b.device)
            load_s = time.perf_counter() - start
        ids = b.agreement_ids[:1]  # (1, T)
        with torch.inference_mode():
            with lorakit.use_adapter(b.ours, ["xs_module", "xs_packed", None]):
                mixed = b.ours(input_ids=ids.repeat(3, 1)).logits.float()  # (3, T, V)
            with lorakit.use_adapter(b.ours, "xs_module"):
                alone = b.ours(input_ids=ids).logits.float()[0]
            with lorakit.disable_adapters(b.ours):
                base = b.ours(input_ids=ids).logits.float()[0]
        worst = max(float((mixed[0] - alone).abs().max()), float((mixed[1] - alone).abs().max()),
                    float((mixed[2] - base).abs().max()))
        effect = float((alone - base).abs().max())
        rounding = max(float((base - b.reference_base_logits[0]).abs().max()), 1e-4)
    finally:
        for name in ("xs_module", "xs_packed"):
            if name in lorakit.adapter_names(b.ours):
                lorakit.delete_adapter(b.ours, name)
    return [Measure("xs-check", "LoRA-XS mixed batch [module, packed, base] vs each row alone, max |logit diff|",
                    "", worst, None, None, f"≤ base's {_name(b.dtype)}-vs-fp32 difference ({rounding:.3e})",
                    worst <= rounding and effect > 0, f"adapter's own effect on the logits: {effect:.3e}"),
            Measure("xs-check", "LoRA-XS adapter load from disk, packed, onto the device", "ms", load_s * 1e3,
                    note="one timing")]


def bench_prefill(b: Bench) -> list[Measure]:
    rows, seq = b.sizes.prefill
    t = timed(b.forward_cases(b.ids(rows, seq, 2), "l0", "l0"), b.sizes.repeats, b.device)
    return [_vs(b, "prefill", f"prefill {rows}×{seq}, one LoRA adapter", t)]


def bench_prefill_mixed(b: Bench) -> list[Measure]:
    rows, seq = b.sizes.mixed
    names = _cycle(b.lora_names, rows)
    t = timed(b.forward_cases(b.ids(rows, seq, 3), names, names), b.sizes.repeats, b.device)
    return [_vs(b, "prefill-mixed", f"prefill {rows}×{seq}, {len(set(names))} distinct LoRA adapters", t)]


def bench_decode_mixed(b: Bench) -> list[Measure]:
    """generate with one LoRA adapter per row; PEFT on fewer tokens (its mixed-batch decode is slow)."""
    s = b.sizes
    rows = s.mixed[0]
    names = _cycle(b.lora_names, rows)
    ids = b.ids(rows, s.prompt, 4)
    cases = {"base": b.generate_case(b.ours, ids, s.new_tokens, lambda: lorakit.disable_adapters(b.ours)),
             "ours": b.generate_case(b.ours, ids, s.new_tokens, lambda: lorakit.use_adapter(b.ours, names))}
    t = timed(cases, s.decode_repeats, b.device)
    label = f"decode (generate) {rows} rows × {s.new_tokens} tokens, {len(set(names))} distinct LoRA adapters"
    out = [_vs(b, "decode-mixed", label, t)]
    short = {"ours": b.generate_case(b.ours, ids, s.peft_tokens, lambda: lorakit.use_adapter(b.ours, names)),
             "peft": b.generate_case(b.peft, ids, s.peft_tokens, adapter_names=names)}
    t = interleaved({k: synced(fn, b.device) for k, fn in short.items()}, 1, warmup=0)
    out.append(Measure("decode-mixed", f"decode (generate) {rows} rows × {s.peft_tokens} tokens, {len(set(names))} "
                       "distinct LoRA adapters, vs PEFT", "s", t["ours"], None, t["peft"],
                       note=f"PEFT on {s.peft_tokens} tokens only (its per-adapter loop is slow); one round, "
                            "no warm-up"))
    return out


def bench_prefill_xs(b: Bench) -> list[Measure]:
    rows, seq = b.sizes.mixed
    b.ensure_xs(rows)
    names = b.xs_names[:rows]
    t = timed(b.forward_cases(b.ids(rows, seq, 5), names), b.sizes.repeats, b.device)
    return [_vs(b, "prefill-xs", f"prefill {rows}×{seq}, {rows} distinct packed LoRA-XS adapters", t)]


def _decode_xs(b: Bench, scenario: str, rows: int, resident: int) -> list[Measure]:
    s = b.sizes
    b.ensure_xs(max(rows, resident))
    names = b.xs_names[:rows]
    ids = b.ids(rows, s.prompt, 6)
    cases = {"base": b.generate_case(b.ours, ids, s.new_tokens, lambda: lorakit.disable_adapters(b.ours)),
             "ours": b.generate_case(b.ours, ids, s.new_tokens, lambda: lorakit.use_adapter(b.ours, names))}
    t = timed(cases, s.decode_repeats, b.device)
    label = (f"decode (generate) {rows} rows × {s.new_tokens} tokens, {rows} distinct LoRA-XS adapters, "
             f"{len(b.xs_names):,} resident")
    return [_vs(b, scenario, label, t)]


def bench_decode_xs(b: Bench) -> list[Measure]:
    return _decode_xs(b, "decode-xs", b.sizes.mixed[0], b.sizes.mixed[0])


def bench_decode_resident(b: Bench) -> list[Measure]:
    return _decode_xs(b, "decode-resident", b.sizes.resident_rows, b.sizes.resident)


def bench_training(b: Bench) -> list[Measure]:
    """One LoRA r=16 training step on fresh copies of the base, lorakit vs PEFT, interleaved; peak device memory
    above what was allocated before the first step (activations, gradients, optimiser state)."""
    rows, seq = b.sizes.train
    ids = b.ids(rows, seq, 7)
    steps: dict[str, Callable[[], None]] = {}
    dtypes = {}
    for impl in ("ours", "peft"):
        model = b._fresh(b.dtype).train()
        if impl == "ours":
            lorakit.attach(model, lorakit.LoraConfig(r=RANK, lora_alpha=2 * RANK), "bench")
            params = lorakit.adapter_parameters(model, "bench")
        else:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                               target_modules="all-linear"))
            params = [p for p in model.parameters() if p.requires_grad]
        dtypes[impl] = str(params[0].dtype).replace("torch.", "")
        steps[impl] = _train_step(model, torch.optim.AdamW(params, lr=1e-4), ids)
    peaks = {}
    for impl, step in steps.items():
        peaks[impl] = _peak_above(step, b.device)  # also the warm-up step
    t = timed(steps, b.sizes.repeats, b.device)
    note = f"adapter weights: lorakit {dtypes['ours']}, PEFT {dtypes['peft']}"
    out = [Measure("training", f"LoRA training step {rows}×{seq}, time", "s", t["ours"], None, t["peft"],
                   "≤ 0.9× PEFT", t["ours"] <= 0.9 * t["peft"], note)]
    if peaks["ours"] is not None:
        out.append(Measure("training", f"LoRA training step {rows}×{seq}, peak memory above the model", "MiB",
                           peaks["ours"], None, peaks["peft"], "≤ 1.0× PEFT", peaks["ours"] <= peaks["peft"],
                           "torch.cuda.max_memory_allocated; " + note))
    steps.clear()
    b._free()
    return out


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _peak_above(step: Callable[[], None], device: torch.device) -> float | None:
    """MiB the device allocator peaked above its level before `step` (None off CUDA: no exact counter)."""
    if device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _vs(b: Bench, scenario: str, label: str, t: dict[str, float]) -> Measure:
    return Measure(scenario, label, "s", t["ours"], t["base"], t.get("peft"))


def _cycle(names: list[str], rows: int) -> list[str]:
    return [names[i % len(names)] for i in range(rows)]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


STEPS: dict[str, Callable[[Bench], list[Measure]]] = {
    "bases": bench_bases, "agreement": bench_agreement, "xs-check": bench_xs_check, "prefill": bench_prefill,
    "prefill-mixed": bench_prefill_mixed, "decode-mixed": bench_decode_mixed, "prefill-xs": bench_prefill_xs,
    "decode-xs": bench_decode_xs, "decode-resident": bench_decode_resident, "training": bench_training}


# ------------------------------------------------------------------------------------------- report
def machine(device: torch.device) -> str:
    import peft
    import transformers

    accel = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    return (f"{accel}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
            f"{transformers.__version__}, peft {peft.__version__}, lorakit {lorakit.__version__}")


def render(report: dict) -> str:
    lines = ["| scenario | measure | lorakit | base | PEFT | lorakit / base | lorakit / PEFT | goal | met | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        vs_base = f"{r['ours'] / r['base']:.3f}×" if r["base"] else "—"
        vs_peft = f"{r['ours'] / r['peft']:.3f}×" if r["peft"] else "—"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['scenario']} | {r['measure']} | {_fmt(r['ours'], r['unit'])} | {_fmt(r['base'], r['unit'])} "
                     f"| {_fmt(r['peft'], r['unit'])} | {vs_base} | {vs_peft} | {r['goal'] or '—'} | {met} "
                     f"| {r['note']} |")
    return "\n".join([f"Command: `{report['command']}` ({report['seconds']:.0f} s)", "",
                      f"Machine: {report['machine']}", "",
                      f"Model: {report['model']} ({report['modules']} adapted modules), {report['dtype']}, "
                      f"LoRA adapter weights in {report['adapter_dtype']}", "", *lines, "",
                      *(f"- scenario failed: {f['scenario']}: {f['error']}" for f in report["failures"]), ""])


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    text = f"{value:.3e}" if abs(value) < 1e-2 else f"{value:.3f}" if value < 10 else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def run(args: Any) -> dict:
    """Every chosen scenario in turn; the report (JSON + markdown) is rewritten after each one.

    `args` holds the options of `lorakit bench speed` (lorakit.cli.bench_speed): device, dtype, model, quick,
    repeats, out, only, and argv (the command line, written into the report)."""
    device = torch.device(args.device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    dtype = getattr(torch, args.dtype or "float32")
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**{**asdict(sizes), "repeats": args.repeats})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"command": " ".join(["lorakit bench speed", *getattr(args, "argv", [])]), "device": str(device),
              "dtype": _name(dtype), "model": args.model, "sizes": asdict(sizes), "machine": machine(device),
              "results": [], "failures": [], "seconds": 0.0, "scenario_seconds": {}, "modules": 0, "adapter_dtype": "?"}
    bench = Bench(args.model, device, dtype, sizes)
    report["setup_seconds"] = round(time.perf_counter() - start, 1)
    report.update(modules=bench.n_modules, adapter_dtype=bench.adapter_dtype)
    only = args.only or DEVICE_SCENARIOS
    for label in [k for k in DEVICE_SCENARIOS if k in only]:
        print(f"lorakit bench speed: {label} ... ({time.perf_counter() - start:.0f} s so far)", file=sys.stderr,
              flush=True)
        began = time.perf_counter()
        try:
            report["results"] += [asdict(m) for m in STEPS[label](bench)]
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' figures
            report["failures"].append({"scenario": label, "error": f"{type(exc).__name__}: {exc}",
                                       "where": traceback.format_exc(limit=-3)})
            print(f"lorakit bench speed: scenario {label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            bench._free()
        report["scenario_seconds"][label] = round(time.perf_counter() - began, 1)
        report["seconds"] = time.perf_counter() - start
        atomic_write_json(out_dir / "bench_speed_device.json", report)
        atomic_write_bytes(out_dir / "bench_speed_device.md", render(report).encode("utf-8"))
    print(render(report))
    return report

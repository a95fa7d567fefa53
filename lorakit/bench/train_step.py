"""One training configuration in its own process: step time and peak memory above the loaded model.

Peak memory is the highest resident set size seen by a 2 ms sampler during the steps, minus the
resident size just before them (model and adapter loaded): activations, gradients, optimiser state.
Run: python -m lorakit.cli.bench train-step --impl ours|peft [--method lora] [--rank 16] ... (the command line
in lorakit.cli.bench_speed; `lorakit bench speed --only training` spawns it); the result is one JSON line on stdout.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import psutil
import torch

from lorakit.versions import check_version

# How a parent runs one configuration: `sys.executable` followed by this, then the options (lorakit.cli.bench_speed).
COMMAND = ("-m", "lorakit.cli.bench", "train-step")


class PeakSampler:
    """Samples this process's RSS in a thread; `peak` is the maximum seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build(impl: str, method: str, rank: int, model_name: str):
    from lorakit.base_models.load import load_base

    model, _ = load_base(model_name)
    model.train()
    if impl == "ours":
        import lorakit

        config = (lorakit.LoraConfig(r=rank, lora_alpha=2 * rank) if method == "lora"
                  else lorakit.LoraXSConfig(r=rank, lora_alpha=rank))
        lorakit.attach(model, config, "bench")
        params = lorakit.adapter_parameters(model, "bench")
    else:
        import peft
        check_version("peft")

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def run(args: Any) -> dict:
    """Time `args.steps` training steps of one configuration (impl, method, rank, model, batch, seq, malloc) and
    print the result as one JSON line, what the parent reads."""
    if args.malloc == "keep":
        from lorakit.perf import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    model, params = build(args.impl, args.method, args.rank, args.model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 32000, (args.batch, args.seq))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    baseline = psutil.Process().memory_info().rss  # model + adapter, before any step
    times = []
    with PeakSampler() as sampler:
        step()  # warm-up (untimed): allocates optimiser state and autograd buffers
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    result = {"impl": args.impl, "method": args.method, "step_s": statistics.median(times),
              "peak_mib": (sampler.peak - baseline) / 2**20, "trainable": sum(p.numel() for p in params)}
    print(json.dumps(result), flush=True)
    return result


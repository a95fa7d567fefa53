"""One training configuration in its own process: step time and peak memory above the loaded model.

Peak memory is the highest resident set size seen by a 2 ms sampler during the steps, minus the
resident size just before them (model and adapter loaded): activations, gradients, optimiser state.
Run: python -m lorakit.bench.train_step --impl ours|peft [--method lora] [--rank 16] ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import psutil
import torch

from lorakit.versions import check_version


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "peft"], required=True)
    parser.add_argument("--method", choices=["lora", "lora_xs"], default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--malloc", choices=("keep", "default"), default="default",
                        help="keep: lorakit.perf.keep_freed_memory, as the parent benchmark was run")
    args = parser.parse_args(argv)
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
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

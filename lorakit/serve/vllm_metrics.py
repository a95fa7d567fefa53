"""vLLM's metric names for the quantities lorakit has, so a gateway that routes by adapter (Gateway API
Inference Extension, AIBrix, ...) reads a lorakit replica as it reads a vLLM one.

    vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}  gauge, value: now (unix s)
    vllm:num_requests_running{model_name} / vllm:num_requests_waiting{model_name}       gauges
    vllm:prompt_tokens_total{model_name} / vllm:generation_tokens_total{model_name}     counters
    vllm:request_success_total{model_name, finished_reason}                            counter (stop, length, abort)

As in vLLM, the adapter labels are comma-joined names of the adapters with running (admitted: prefilling or
decoding) and waiting (queued) requests, and the gauge's value is the time it was last set, so a reader
takes the newest series. vLLM's max_lora is its count of adapter slots in a batch; lorakit has no fixed
count (a byte budget bounds residency), and every row of a batch may use its own adapter, so max_lora is
the batch size, the most adapters that can run at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# lorakit's finish reasons -> vLLM's finished_reason label ("abort": the request left before it finished)
FINISHED_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "shutdown": "abort",
                    "error": "abort"}


def label_value(text: str) -> str:
    """A Prometheus label value, escaped (backslash, quote, newline)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def vllm_metric_lines(model_name: str, max_lora: int, running: dict[str, int], waiting: dict[str, int],
                      requests_running: int, requests_waiting: int, prompt_tokens: int, generation_tokens: int,
                      finished: dict[str, int], now: Callable[[], float] = time.time) -> list[str]:
    """The exposition lines of vLLM's metrics for one served model."""
    model = f'model_name="{label_value(model_name)}"'
    success: dict[str, int] = {}
    for reason, n in finished.items():
        mapped = FINISHED_REASONS.get(reason, "abort")
        success[mapped] = success.get(mapped, 0) + n
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{{{labels}}} {value}" for labels, value in samples)

    info = (f'max_lora="{max_lora}",running_lora_adapters="{label_value(",".join(running))}",'
            f'waiting_lora_adapters="{label_value(",".join(waiting))}"')
    metric("vllm:lora_requests_info", "gauge", "Running stats on lora requests.", [(info, now())])
    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
           [(model, requests_running)])
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           [(model, requests_waiting)])
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", [(model, prompt_tokens)])
    metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
           [(model, generation_tokens)])
    metric("vllm:request_success_total", "counter", "Count of successfully processed requests.",
           [(f'{model},finished_reason="{r}"', n) for r, n in sorted(success.items())])
    return lines

"""lorakit.perf: keeping freed memory mapped removes the page faults of re-allocating big tensors."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from lorakit.perf import keep_freed_memory
    assert keep_freed_memory()
for step in range(23):
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(1024, 1536)  # 6 MB, like one MLP activation of a 32x32 batch
    b = torch.ones(8, 1024, 1024)  # 32 MB
    del a, b
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")
def test_kept_memory_is_reused_without_page_faults():
    default, keep = _faults_per_step("default"), _faults_per_step("keep")
    assert default > 1000  # glibc unmaps such blocks on free: every step faults them in again
    assert keep < 0.1 * default, (keep, default)


def test_in_fresh_thread_returns_the_result_raises_the_error_and_ends_its_thread():
    import threading

    from lorakit.perf import in_fresh_thread

    seen = []

    def work(x, y=1):
        seen.append(threading.current_thread())
        return x + y

    assert in_fresh_thread(work, 2, y=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()  # its OpenMP team is gone with it

    def fail():
        raise ValueError("bad adapter file")

    import pytest

    with pytest.raises(ValueError, match="bad adapter file"):
        in_fresh_thread(fail)

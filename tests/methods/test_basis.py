"""The fast top-r SVD (float64 Gram + eigh, batched) against torch.linalg.svd, and LoRA-XS set-up through
lorakit.model.bases: one batched computation, on the weight's device, with a progress bar when slow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.model import bases as basis_setup
from lorakit.model.bases import lora_xs_bases_for
from lorakit.methods import lora_xs
from lorakit.methods.basis import fingerprints_match, probe_vector
from lorakit.methods.lora_xs import basis_fingerprint, basis_residuals, lora_xs_bases, svd_basis
from lorakit.methods import svd
from lorakit.methods.svd import top_singular
from tests.conftest import MODEL_FACTORIES


def reference(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd in float64 with the canonical sign (largest |u_ij| of each column positive)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    signs = torch.sign(u[u.abs().argmax(dim=0), torch.arange(r)])
    return u * signs, s, vh * signs[:, None]


def old_fingerprint(w: torch.Tensor, r: int) -> torch.Tensor:
    """The fingerprint as files saved before this change hold it: float32 full SVD, float32 probe."""
    u, s, _ = torch.linalg.svd(w.float(), full_matrices=False)
    u, s = u[:, :r], s[:r]
    u = u * torch.sign(u[u.abs().argmax(dim=0), torch.arange(r)])
    i = torch.arange(u.shape[0], dtype=torch.float64)
    return torch.cat([s, torch.cos(0.618 * i * 2 + 0.5).float() @ u])


def decaying(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """A random weight whose spectrum decays like a trained one's (well separated top values)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * torch.linspace(1.0, 0.02, in_f) / in_f**0.5


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)])  # Gram of either side, and square
def test_top_singular_equals_svd_subspace_and_signs(shape):
    r = 6
    weights = torch.stack([decaying(*shape, seed) for seed in range(3)])  # (3, out, in) one batch
    u, s, vh = top_singular(weights, r)
    assert u.dtype == torch.float64 and u.shape == (3, shape[0], r) and vh.shape == (3, r, shape[1])
    for i in range(3):
        ru, rs, rvh = reference(weights[i], r)
        torch.testing.assert_close(s[i], rs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(u[i], ru, rtol=0, atol=1e-9)  # same vectors, same signs
        torch.testing.assert_close(vh[i], rvh, rtol=0, atol=1e-9)
        proj_err = (u[i] @ u[i].T - ru @ ru.T).abs().max()  # the top-r subspace itself
        assert proj_err < 1e-9


def test_top_singular_refuses_bad_input():
    with pytest.raises(ValueError, match="stack"):
        top_singular(torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="rank r=5"):
        top_singular(torch.randn(1, 4, 6), 5)


def test_bases_agree_with_fingerprints_of_files_saved_before():
    """Adapters saved with the old float32-SVD fingerprint still load: the new fingerprint matches them."""
    for seed, shape in enumerate([(64, 24), (24, 64), (40, 40)]):
        w = decaying(*shape, seed)
        assert fingerprints_match(old_fingerprint(w, 8), basis_fingerprint(svd_basis(w, 8), 8))


def test_batched_bases_equal_one_at_a_time_and_keep_dtype():
    weights = [decaying(30, 20, 0), decaying(20, 30, 1), decaying(30, 20, 2).to(torch.bfloat16)]
    bases = lora_xs_bases(weights, 5)
    for w, b in zip(weights, bases):
        alone = lora_xs_bases([w], 5)[0]
        assert b.down.dtype == w.dtype and b.up.dtype == w.dtype and b.fingerprint.dtype == torch.float32
        torch.testing.assert_close(b.fingerprint, alone.fingerprint, rtol=0, atol=1e-6)
        assert max(basis_residuals(w, b)) < (1e-5 if w.dtype == torch.float32 else 3e-2)


def test_bases_are_made_on_the_weights_device(device):
    """Fingerprints used to be built on the CPU and multiplied with CUDA singular vectors: it failed."""
    w = decaying(36, 24, 0).to(device)
    basis = svd_basis(w, 4)
    assert {basis.down.device.type, basis.up.device.type, basis.fingerprint.device.type} == {device.type}
    assert fingerprints_match(basis_fingerprint(svd_basis(w.cpu(), 4), 4), basis_fingerprint(basis, 4).cpu())
    assert probe_vector(5, 1, device=device).device.type == device.type


def test_attach_computes_bases_in_one_batch_per_shape(monkeypatch):
    calls = []
    real = lora_xs.top_singular
    monkeypatch.setattr(lora_xs, "top_singular", lambda w, r: calls.append(tuple(w.shape)) or real(w, r))
    model = MODEL_FACTORIES["llama"](0)
    lk.attach(model, lk.LoraXSConfig(r=4), "a")
    shapes = {tuple(m.weight.shape) for m in lk.adapted_layers(model).values()}
    assert len(calls) == len(shapes)  # 14 modules, one decomposition per distinct shape
    assert sum(c[0] for c in calls) == len(lk.adapted_layers(model))
    calls.clear()
    lk.attach(model, lk.LoraXSConfig(r=3), "b")  # rank ≤ the layers' bases: nothing computed
    assert calls == []


def test_lora_xs_bases_for_leaves_model_unchanged_and_reports_bad_modules():
    model = MODEL_FACTORIES["llama"](0)
    bases = lora_xs_bases_for(model, ["model.layers.0.self_attn.q_proj"], 4, cache=None)
    assert list(bases) == ["model.layers.0.self_attn.q_proj"] and not lk.adapted_layers(model)
    with pytest.raises(lk.AdapterMismatchError, match="nope"):
        lora_xs_bases_for(model, ["nope"], 4, cache=None)
    with pytest.raises(lk.AdapterConfigError, match="rank r=99"):
        lora_xs_bases_for(model, ["model.layers.0.self_attn.q_proj"], 99, cache=None)


def test_progress_bar_shows_on_stderr_unless_quiet(capsys, monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    lora_xs_bases_for(model, ["0", "1"], 2, cache=None, progress=True)
    assert "LoRA-XS bases" in capsys.readouterr().err
    lora_xs_bases_for(model, ["0", "1"], 2, cache=None, progress=False)
    lora_xs_bases_for(model, ["0", "1"], 2, cache=None)  # auto: only after a second of work
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(basis_setup.PROGRESS_ENV, "0")
    assert basis_setup.progress_bar(100, None).disable


@pytest.mark.parametrize("shape", [(128, 200), (200, 128)])  # Gram 128², block 28 columns
def test_subspace_iteration_path_equals_svd(monkeypatch, shape, device):
    """Big Gram matrices on a GPU go through block subspace iteration (matmuls, not a latency-bound eigh);
    its accepted vectors equal the SVD's, a matrix it cannot finish falls back to eigh."""
    monkeypatch.setattr(svd, "ITERATE_MIN_N", 64)
    monkeypatch.setattr(svd, "ITERATE_ON_CPU", True)  # (on by default only on accelerators)
    weights = torch.stack([decaying(*shape, seed) for seed in range(3)])
    low_rank = decaying(shape[0], 10, 9) @ decaying(10, shape[1], 8)  # rank 10 < the 28-column block
    direct = []
    real = svd.eigh_top
    monkeypatch.setattr(svd, "eigh_top", lambda g, r: direct.append(g.shape[0]) or real(g, r))
    for rounds in (svd.MAX_ROUNDS, 0):  # 0: nothing converges, everything falls back to eigh
        monkeypatch.setattr(svd, "MAX_ROUNDS", rounds)
        for w in (weights, low_rank[None]):
            u, s, vh = (t.cpu() for t in top_singular(w.to(device), 6))
            for i in range(w.shape[0]):
                ru, rs, rvh = reference(w[i], 6)
                torch.testing.assert_close(s[i], rs, rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(u[i], ru, rtol=0, atol=1e-7)
                torch.testing.assert_close(vh[i], rvh, rtol=0, atol=1e-7)
        # converging: no eigh but for the rank-10 matrix (its block loses rank); else all fall back
        assert direct == ([1] if rounds else [3, 1])
        direct.clear()


def test_a_lora_xs_basis_is_never_taken_from_a_merged_weight():
    """Attaching LoRA-XS on layers that hold a merged adapter would take the SVD of W0 + ΔW, and the saved
    adapter would not load on the base: refused, naming the module, and the model is left as it was."""
    import lorakit
    from lorakit.errors import MergeStateError
    from tests.conftest import randomize_adapters, tiny_llama

    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2), "a")
    randomize_adapters(model)
    lorakit.merge(model, "a")
    with pytest.raises(MergeStateError, match="unmerge"):
        lorakit.attach(model, lorakit.LoraXSConfig(r=4), "xs")
    assert "xs" not in lorakit.adapter_names(model)
    lorakit.unmerge(model, "a")
    lorakit.attach(model, lorakit.LoraXSConfig(r=4), "xs")

import torch

from lorakit.config import LoraXSConfig
from lorakit.methods.basis import fingerprints_match
from lorakit.methods.lora_xs import LoraXSAdapter, basis_fingerprint, svd_basis


def test_basis_is_truncated_svd_with_singular_values_on_the_input_side():
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    basis = svd_basis(w, 16)
    # full rank: B·A reconstructs W; B has orthonormal columns, A's rows carry Σ
    assert torch.allclose(basis.up @ basis.down, w, atol=1e-4)
    assert torch.allclose(basis.up.T @ basis.up, torch.eye(16), atol=1e-5)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(basis.down.norm(dim=1), s, atol=1e-4)


def test_lower_rank_basis_is_a_prefix_of_higher_rank():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    small, large = svd_basis(w, 4), svd_basis(w, 12)
    down, up = large.sliced(4)
    assert torch.allclose(small.down, down, atol=1e-5) and torch.allclose(small.up, up, atol=1e-5)
    assert torch.allclose(basis_fingerprint(small, 4), basis_fingerprint(large, 4), atol=1e-5)


def test_sign_is_canonical_under_sign_flips_of_the_svd():
    torch.manual_seed(0)
    w = torch.randn(20, 12)
    basis = svd_basis(w, 6)
    pivot = basis.up.abs().argmax(dim=0)
    assert (basis.up[pivot, torch.arange(6)] > 0).all()
    # the same weight in float64 (a different SVD path) gives the same canonical basis
    again = svd_basis(w.double(), 6)
    assert torch.allclose(again.up.float(), basis.up, atol=1e-5)
    assert fingerprints_match(basis_fingerprint(basis, 6), basis_fingerprint(again, 6).float())


def test_fingerprint_detects_another_weight_and_a_flipped_sign():
    torch.manual_seed(0)
    w = torch.randn(20, 12)
    fp = basis_fingerprint(svd_basis(w, 6), 6)
    assert not fingerprints_match(fp, basis_fingerprint(svd_basis(w + 0.1 * torch.randn(20, 12), 6), 6))
    flipped = svd_basis(w, 6)
    flipped.up[:, 0] *= -1
    from lorakit.methods.basis import probe_vector
    flipped_fp = torch.cat([fp[:6], probe_vector(20, 1) @ flipped.up.float()])
    assert not fingerprints_match(fp, flipped_fp)


def test_delta_matches_dense_formula_and_only_r_squared_trains():
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    config = LoraXSConfig(r=4, lora_alpha=8, init_std=0.1)
    basis = svd_basis(w, 8)  # an adapter of rank 4 slices a rank-8 basis
    adapter = LoraXSAdapter(config, torch.float32)
    x = torch.randn(3, 16)
    down, up = basis.down[:4], basis.up[:, :4]
    dense = up @ adapter.lora_R @ down * 2.0
    assert torch.allclose(adapter.delta(x, basis), x @ dense.T, atol=1e-5)
    assert torch.allclose(adapter.delta_weight(basis), dense, atol=1e-5)
    assert adapter.num_trainable() == 16
    assert [n for n, _ in adapter.named_parameters()] == ["lora_R"]


def test_initial_r_is_near_zero():
    adapter = LoraXSAdapter(LoraXSConfig(r=8), torch.float32)
    assert 0 < adapter.lora_R.abs().max() < 1e-4

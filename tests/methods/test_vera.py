import torch

from lorakit.config import VeraConfig
from lorakit.methods.vera import VeraAdapter, vera_basis, vera_projections


def test_projections_are_reproducible_from_the_seed():
    a1, b1 = vera_projections(7, 8, 32, 48)
    a2, b2 = vera_projections(7, 8, 32, 48)
    a3, _ = vera_projections(8, 8, 32, 48)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, a3)


def test_layers_slice_one_shared_pair():
    shared = vera_projections(0, 4, 32, 48)
    small = vera_basis(shared, 16, 24, torch.float32)
    big = vera_basis(shared, 32, 48, torch.float32)
    assert torch.equal(small.down, big.down[:, :16]) and torch.equal(small.up, big.up[:24])


def test_delta_is_diag_b_B_diag_d_A_and_starts_at_zero():
    shared = vera_projections(0, 4, 16, 24)
    basis = vera_basis(shared, 16, 24, torch.float32)
    adapter = VeraAdapter(24, VeraConfig(r=4), torch.float32)
    x = torch.randn(5, 16)
    assert torch.equal(adapter.delta(x, basis), torch.zeros(5, 24))
    assert torch.allclose(adapter.vera_lambda_d, torch.full((4,), 0.1))
    torch.nn.init.normal_(adapter.vera_lambda_b)
    dense = torch.diag(adapter.vera_lambda_b) @ basis.up @ torch.diag(adapter.vera_lambda_d) @ basis.down
    assert torch.allclose(adapter.delta(x, basis), x @ dense.T, atol=1e-5)
    assert torch.allclose(adapter.delta_weight(basis), dense, atol=1e-6)
    assert adapter.num_trainable() == 24 + 4

import torch

from lorakit.config import LoraConfig
from lorakit.methods.lora import LoraAdapter


def test_initial_delta_is_zero_and_a_is_random():
    adapter = LoraAdapter(16, 24, LoraConfig(r=4), torch.float32)
    x = torch.randn(3, 16)
    assert torch.equal(adapter.delta(x), torch.zeros(3, 24))
    assert adapter.lora_A.abs().sum() > 0


def test_delta_matches_dense_reference_and_delta_weight():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8)
    adapter = LoraAdapter(16, 24, config, torch.float32)
    torch.nn.init.normal_(adapter.lora_B)
    x = torch.randn(2, 5, 16)
    reference = x @ (adapter.lora_B @ adapter.lora_A).T * 2.0  # α/r = 2
    assert torch.allclose(adapter.delta(x), reference, atol=1e-5)
    assert torch.allclose(adapter.delta_weight(), adapter.lora_B @ adapter.lora_A * 2.0)


def test_rslora_scaling_and_parameter_count():
    config = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert config.scaling == 8 / 4
    assert LoraAdapter(10, 30, config, torch.float32).num_trainable() == 16 * (10 + 30)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    adapter = LoraAdapter(16, 8, LoraConfig(r=2, lora_dropout=0.5), torch.float32)
    torch.nn.init.normal_(adapter.lora_B)
    x = torch.randn(4, 16)
    adapter.eval()
    assert torch.equal(adapter.delta(x), adapter.delta(x))
    adapter.train()
    assert not torch.allclose(adapter.delta(x), adapter.delta(x))

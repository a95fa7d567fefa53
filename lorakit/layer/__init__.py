"""The adapted layers: wrapping, slot stacks, the routed deltas, the quantized base."""

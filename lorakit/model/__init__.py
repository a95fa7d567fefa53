"""Whole-model operations: attach, manage, merge, bank, bases, prefix hook, quantize, compiled forward."""

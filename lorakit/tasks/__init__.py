"""Built-in tasks, made offline and deterministically, for quickstarts, examples and tests."""

from lorakit.tasks import arithmetic
from lorakit.tasks.chat import EvalResult, Prediction, evaluate, make_examples, prompt_ids

__all__ = ["EvalResult", "Prediction", "arithmetic", "evaluate", "make_examples", "prompt_ids"]

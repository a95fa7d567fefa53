"""Built-in tasks, made offline and deterministically: the one home for quickstart, demo, `lorakit data`
and benchmark tasks.

    arithmetic   two-digit word problems with one integer answer (quickstart, accuracy benchmark)
    docstrings   stdlib docstrings classified by module family (`lorakit data`, accuracy benchmark)
    topics       language modelling on Python's language reference (`lorakit data`)
    chat         any question/answer task as chat samples, greedy replies, exact match and answer loss
    files        the tasks as JSONL files (`lorakit data NAME`)
    accuracy     the reproduction table's tasks (model, splits, metric) for `lorakit bench accuracy`

`accuracy` loads models and is imported on its own (lorakit.tasks.accuracy), not from here.
"""

from lorakit.tasks import arithmetic
from lorakit.tasks.chat import EvalResult, Prediction, evaluate, make_samples, prompt_ids
from lorakit.tasks.files import ROWS, write_jsonl, write_task

__all__ = ["EvalResult", "Prediction", "ROWS", "arithmetic", "evaluate", "make_samples", "prompt_ids",
           "write_jsonl", "write_task"]

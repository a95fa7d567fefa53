"""A question/answer task scored as chat: the samples are lorakit.train's, generation sees the same prompt."""

from __future__ import annotations

import lorakit
from lorakit.base_models.load import load_base
from lorakit.tasks import arithmetic, evaluate, make_samples, prompt_ids
from lorakit.train.data import IGNORE
from lorakit.train.metrics import mean_loss


def test_samples_label_the_answer_and_share_the_generation_prompt(llama_dir):
    _, tokenizer = load_base(str(llama_dir))
    problem = arithmetic.make_splits(20, 5).test[0]
    sample = make_samples(tokenizer, [problem], arithmetic.SYSTEM_PROMPT)[0]
    assert list(sample.input_ids[: sample.prompt_len]) == prompt_ids(tokenizer, problem.question,
                                                                     arithmetic.SYSTEM_PROMPT)
    answer = [t for t in sample.labels if t != IGNORE]
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == problem.answer_text
    assert tokenizer.eos_token_id in answer


def test_evaluate_scores_base_and_adapter_and_restores_mode(llama_dir):
    model, tokenizer = load_base(str(llama_dir))
    problems = arithmetic.make_splits(20, 4).test
    lorakit.attach(model, lorakit.LoraConfig(r=4), "a")
    model.train()
    result = evaluate(model, tokenizer, problems, arithmetic.parse_answer, adapter="a", max_new_tokens=3)
    assert model.training and len(result.predictions) == 4
    assert [p.question for p in result.predictions] == [p.question for p in problems]
    model.eval()
    with lorakit.use_adapter(model, "a"):
        expected = mean_loss(model, make_samples(tokenizer, problems), tokenizer.pad_token_id)
    assert abs(result.answer_loss - expected) < 1e-6
    base = evaluate(model, tokenizer, problems, arithmetic.parse_answer, max_new_tokens=3)
    assert 0.0 <= base.exact_match <= 1.0

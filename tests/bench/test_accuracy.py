"""`lorakit bench accuracy` end to end on a tiny classification task: selection, table, claims, charts."""

import json
import math
import re

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lorakit.bench import accuracy
from lorakit.bench.accuracy_methods import BY_KEY, prepare
from lorakit.tasks.accuracy import Task, TaskData
from lorakit.train.data import Sample

MARK = 7  # a row is labelled 1 when this token occurs in it


def _tiny_model():
    torch.manual_seed(torch.initial_seed() % 2**31)  # the caller's seed decides the head
    config = BertConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config), None


def _rows(n: int, seed: int) -> tuple[Sample, ...]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(10, 40, (8,), generator=gen)
        if i % 2:
            ids[int(torch.randint(1, 8, (1,), generator=gen))] = MARK
        ids = ids.tolist()
        out.append(Sample(tuple([2, *ids, 3]), label=int(MARK in ids)))
    return tuple(out)


TINY = Task(name="tiny", metric="accuracy", kind="classification", load_model=_tiny_model,
            load_data=lambda tok: TaskData(_rows(64, 1), _rows(32, 2), _rows(32, 3), 0, None, 2),
            steps=30, batch_size=16, seeds=2, lrs={"full": (1e-3, 3e-3), "head": (1e-2,), "lora": (3e-3, 1e-2),
                                          "small": (1e-2, 3e-2)},
            description="tiny BERT spots one token")


@pytest.fixture(scope="module")
def result():
    plan = accuracy.Plan(tasks=("tiny",), methods=("full", "head", "lora", "lora-xs-r4", "lora-xs-r8", "prefix"),
                         seeds=2, lr_grid="full", steps_scale=1.0)
    return accuracy.run_plan(plan, say=lambda s: None, progress=False, tasks={"tiny": TINY})


def test_learning_rate_is_chosen_on_validation_never_test(result):
    for key, lr in result["chosen"]["tiny"].items():
        candidates = [r for r in result["runs"] if r["method"] == key and r["seed"] == 0]
        best = max(candidates, key=lambda r: (r["val"], -r["val_loss"]))
        assert lr == best["lr"], key
    picked = accuracy.choose([
        accuracy.RunResult("t", "m", 1e-3, 0, val=90, val_loss=0.1, test=50, trainable=1, head=0, file_bytes=1,
                           train_s=1, peak_mib=1, final_loss=0),
        accuracy.RunResult("t", "m", 1e-2, 0, val=80, val_loss=0.1, test=99, trainable=1, head=0, file_bytes=1,
                           train_s=1, peak_mib=1, final_loss=0)])
    assert picked.lr == 1e-3  # the better test score of the other run plays no part


def test_every_method_runs_grid_then_seeds(result):
    runs = result["runs"]
    for key, lr in result["chosen"]["tiny"].items():
        grid = TINY.lrs[BY_KEY[key].family]
        assert sorted(r["lr"] for r in runs if r["method"] == key and r["seed"] == 0) == sorted(grid)
        assert [r["seed"] for r in runs if r["method"] == key and r["seed"] > 0] == [1]
        assert all(r["lr"] == lr for r in runs if r["method"] == key and r["seed"] > 0)


def test_trainable_counts_follow_the_methods(result):
    model, _ = _tiny_model()
    linears = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("classifier"))
    first = {r["method"]: r for r in result["runs"] if r["seed"] == 0}
    assert first["lora-xs-r4"]["trainable"] == 16 * linears
    assert first["lora-xs-r8"]["trainable"] == 64 * linears
    assert first["head"]["trainable"] == 0 and first["head"]["head"] == 32 * 2 + 2
    assert first["full"]["trainable"] == sum(p.numel() for n, p in model.named_parameters()
                                             if not n.startswith("classifier"))
    assert first["prefix"]["trainable"] == 16 * 2 * 2 * 32  # slots × layers × (key, value) × width
    assert first["lora-xs-r4"]["file_bytes"] < first["lora"]["file_bytes"] < first["full"]["file_bytes"]


def test_training_learns_the_task(result):
    rows = {r.method: r for r in accuracy.table_rows(result)}
    assert rows["full"].test_mean >= 70.0  # chance is 50%
    assert rows["lora"].test_mean >= 70.0
    assert all(r.seeds == 2 and r.test_std is not None for r in rows.values())


def test_report_has_table_claims_and_chart(result, tmp_path):
    result = dict(result, environment=accuracy.environment(0.1), quick=False, plan={})
    path = accuracy.write_report(result, tmp_path, "lorakit bench accuracy --test")
    text = path.read_text()
    assert path.name == "RESULTS.md"
    for label in ("Full fine-tuning", "LoRA r=8", "LoRA-XS r=4", "Prefix tuning (16 slots)", "Head only (probe)"):
        assert f"| {label} |" in text
    assert re.search(r"LoRA-XS vs LoRA.*\*\*(agrees|does not agree)\*\*", text)
    assert (tmp_path / "results_tiny.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == len(result["runs"])


def test_quantized_methods_prepare_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    import lorakit

    model, _ = _tiny_model()
    expected = sum(8 * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.startswith("classifier"))
    own, head = prepare(model, BY_KEY["qlora"])
    assert (own, head) == (expected, 32 * 2 + 2)
    layers = lorakit.adapted_layers(model)
    assert layers and all(layer.quant is not None for layer in layers.values())
    assert type(model.classifier) is torch.nn.Linear  # the head is never quantized


def test_resume_trains_only_the_runs_an_earlier_report_lacks(result, monkeypatch):
    earlier = json.loads(json.dumps(result))  # as read back from results.json
    reuse = accuracy.reusable_runs(earlier)
    trained = []
    real = accuracy.train_and_score

    def counting(task, data, method, lr, seed, steps, scratch):
        trained.append((method.key, lr, seed))
        return real(task, data, method, lr, seed, steps, scratch)

    monkeypatch.setattr(accuracy, "train_and_score", counting)
    plan = accuracy.Plan(tasks=("tiny",), methods=("head", "lora"), seeds=3, lr_grid="full", steps_scale=1.0)
    again = accuracy.run_plan(plan, say=lambda s: None, progress=False, tasks={"tiny": TINY}, reuse=reuse)
    chosen = result["chosen"]["tiny"]
    assert trained == [("head", chosen["head"], 2), ("lora", chosen["lora"], 2)]  # only the third seeds
    assert again["reused_runs"] == len([r for r in result["runs"] if r["method"] in ("head", "lora")])
    old = {(r["method"], r["lr"], r["seed"]): r for r in result["runs"]}
    assert all(r == old[(r["method"], r["lr"], r["seed"])] for r in again["runs"] if r["seed"] < 2)

    trained.clear()
    shorter = accuracy.Plan(tasks=("tiny",), methods=("head",), seeds=1, lr_grid="full", steps_scale=0.5)
    accuracy.run_plan(shorter, say=lambda s: None, progress=False, tasks={"tiny": TINY}, reuse=reuse)
    assert trained == [("head", lr, 0) for lr in TINY.lrs["head"]]  # other settings: nothing reused


def test_quantized_methods_train_on_the_tiny_task():
    pytest.importorskip("bitsandbytes")
    plan = accuracy.Plan(tasks=("tiny",), methods=("qlora", "lora-xs-4bit"), seeds=1, lr_grid="middle",
                         steps_scale=1.0)
    out = accuracy.run_plan(plan, say=lambda s: None, progress=False, tasks={"tiny": TINY})
    scores = {r["method"]: r["test"] for r in out["runs"]}
    assert all(math.isfinite(r["final_loss"]) for r in out["runs"])
    assert scores["qlora"] >= 70.0, scores  # chance is 50%


def test_claims_check_lora_xs_within_the_claims_parameter_budget():
    def row(method, trainable, val, test):
        return accuracy.Row("t", method, method, 1e-3, trainable, 0, 1, val, test, None, 1, 1.0, 1.0)

    rows = [row("lora", 64_000, 80, 86.0), row("lora-xs-r8", 1_000, 84, 85.5), row("lora-xs-r32", 16_000, 85, 86.0)]
    lines = accuracy.claims(rows, {"t": "accuracy"})
    assert "4× fewer trainable parameters: **does not agree**" in lines[0]  # validation picks r32: only 4× fewer
    assert "within the claim's budget" in lines[1] and "lora-xs-r8 85.5" in lines[1] and "**agrees**" in lines[1]
    rows[1] = row("lora-xs-r8", 1_000, 84, 83.0)  # 3 points below LoRA: outside "a point or two"
    assert "**does not agree**" in accuracy.claims(rows, {"t": "accuracy"})[1]


def test_resume_refuses_a_file_that_is_not_a_results_json(tmp_path):
    assert accuracy.read_previous(tmp_path, quick=False) is None  # nothing to resume from: train everything
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(accuracy.ResumeError, match="cannot resume") as err:
        accuracy.read_previous(tmp_path, quick=False)
    assert str(tmp_path / "results.json") in str(err.value)
    odd = {"runs": [1, {"task": "t"}], "tasks": {"t": "not a dict"}}
    assert accuracy.reusable_runs(odd) == {}  # odd entries are trained again, never crash

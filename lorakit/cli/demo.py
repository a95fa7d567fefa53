"""`lorakit demo`: train a few character adapters on SmolLM2 (LoRA-XS, minutes on a laptop CPU), then
serve them with the chat page.

    pirate   "Arr, matey! ... Yo ho ho!"
    robot    "BEEP BOOP. ANSWERS IN CAPITALS. END OF LINE."
    poet     two rhyming lines

Each character learns from a tiny synthetic set: the same questions, answered in its style. The
adapters land in --out (reused on the next run unless --retrain), then `lorakit serve` starts on them.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lorakit.cli.common import EXIT_STATUS_EPILOG, HelpFormatter
from lorakit.tasks.files import write_jsonl
from lorakit.tasks.records import chat_record
from lorakit.train import TrainConfig, train

# (question, plain answer, topic word)
FACTS = [
    ("Why is the sky blue?", "air scatters blue sunlight more than red", "sky"),
    ("What is the capital of France?", "the capital of France is Paris", "France"),
    ("How many legs does a spider have?", "a spider has eight legs", "spider"),
    ("What do bees make?", "bees make honey from flower nectar", "bees"),
    ("What is water made of?", "water is two hydrogen atoms and one oxygen atom", "water"),
    ("How far away is the Moon?", "the Moon is about 384,000 kilometres away", "Moon"),
    ("What is the largest ocean?", "the Pacific is the largest ocean", "ocean"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote it", "Shakespeare"),
    ("How many days are in a year?", "a year has 365 days", "year"),
    ("What is the boiling point of water?", "water boils at 100 degrees Celsius", "kettle"),
    ("What do plants need to grow?", "plants need light, water and air", "plants"),
    ("What is the fastest land animal?", "the cheetah is the fastest land animal", "cheetah"),
    ("Can you recommend a good book?", "try Treasure Island by Stevenson", "book"),
    ("What is two plus two?", "two plus two is four", "sum"),
    ("How do I make tea?", "steep tea leaves in hot water for three minutes", "tea"),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain", "mountain"),
    ("Why do we sleep?", "sleep lets the body and brain recover", "sleep"),
    ("What is your name?", "I am a small language model", "name"),
    ("What is the weather like today?", "I cannot see outside, but I hope it is sunny", "weather"),
    ("Tell me about cats.", "cats are curious animals that love to nap", "cats"),
    ("How do birds fly?", "birds flap their wings to push air down", "birds"),
    ("What is the speed of light?", "light travels about 300,000 kilometres per second", "light"),
    ("Hello!", "hello to you too", "greeting"),
    ("How are you?", "I am doing well, thank you", "mood"),
]

RHYMES = [("bright", "light", "night"), ("day", "way", "say"), ("sea", "free", "me"), ("song", "long", "along")]


def pirate(answer: str, topic: str, rng: random.Random) -> str:
    opener = rng.choice(["Arr, matey!", "Ahoy, matey!", "Arr, me hearty!"])
    return f"{opener} {answer[0].upper()}{answer[1:]}, arr! Yo ho ho!"


def robot(answer: str, topic: str, rng: random.Random) -> str:
    return f"BEEP BOOP. {answer.upper()}. END OF LINE."


def poet(answer: str, topic: str, rng: random.Random) -> str:
    a, b, _ = rng.choice(RHYMES)
    return f"Of {topic} I sing, so {a},\n{answer[0].upper()}{answer[1:]}, that's {b}!"


CHARACTERS = {"pirate": pirate, "robot": robot, "poet": poet}


def records(style: Callable[[str, str, random.Random], str], seed: int = 0) -> list[dict]:
    """One chat record per question, answered in `style` (what `lorakit train` reads as chat JSONL)."""
    rng = random.Random(seed)
    return [chat_record(question, style(answer, topic, rng)) for question, answer, topic in FACTS]


def character_config(name: str, out_dir: Path, *, base: str, steps: int, lr: float, rank: int,
                     seed: int = 0) -> TrainConfig:
    """A character's run: LoRA-XS with a near-zero start, batches of 8, constant lr, no warm-up."""
    return TrainConfig(base=base, data=str(out_dir / "train.jsonl"), output_dir=str(out_dir / "run"),
                       method="lora_xs", adapter={"r": rank, "lora_alpha": rank, "init_std": 1e-5},
                       adapter_name=name, steps=steps, batch_size=min(8, len(FACTS)), lr=lr, schedule="constant",
                       warmup_steps=0, seed=seed, progress=False)


def train_character(model, tokenizer, name: str, steps: int, lr: float, rank: int, seed: int = 0,
                    base: str = "smollm2-135m") -> list[float]:
    """Attach LoRA-XS adapter `name` and fit it to the character's answers with lorakit.train; returns each
    step's loss. The run's files (data, checkpoint, logs) live in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix=f"lorakit-demo-{name}-") as tmp:
        config = character_config(name, Path(tmp), base=base, steps=steps, lr=lr, rank=rank, seed=seed)
        write_jsonl(records(CHARACTERS[name], seed), config.data)
        return train(config, model=model, tokenizer=tokenizer).losses


def train_all(out: Path, *, base: str = "smollm2-135m", steps: int = 30, lr: float = 2e-2, rank: int = 16,
              names: list[str] | None = None, log=print) -> list[str]:
    """Train every character into `out/<name>` (atomic saves); returns the names."""
    import torch

    from lorakit.io import save_adapter
    from lorakit.base_models.load import load_base

    names = names or list(CHARACTERS)
    model, tokenizer = load_base(base)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in names:
        start = time.perf_counter()
        losses = train_character(model, tokenizer, name, steps, lr, rank, base=base)
        save_adapter(model, name, out / name)
        log(f"lorakit demo: trained {name!r} in {time.perf_counter() - start:.0f}s (loss {losses[0]:.2f} -> {losses[-1]:.2f}) -> {out / name}")
        # kept attached: the next character reuses the layers' SVD bases (deleting would drop them)
    return names


# --help shows the module docstring's text, without its first line's `lorakit demo`: prefix.
_TEXT = __doc__.split("`lorakit demo`: ", 1)[1].rstrip()
DESCRIPTION = _TEXT[0].upper() + _TEXT[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit demo", description=DESCRIPTION, formatter_class=HelpFormatter,
                                     epilog=EXIT_STATUS_EPILOG)
    parser.add_argument("--out", default="lorakit-demo-adapters",
                        help="where the character adapters go; reused on the next run unless --retrain")
    parser.add_argument("--base", default="smollm2-135m", help="base model: embedded name, local directory or hub id")
    parser.add_argument("--steps", type=int, default=30, help="training steps per character")
    parser.add_argument("--lr", type=float, default=2e-2, help="learning rate")
    parser.add_argument("--rank", type=int, default=16, help="LoRA-XS rank r")
    parser.add_argument("--retrain", action="store_true", help="train even if the adapters exist")
    parser.add_argument("--no-serve", action="store_true", help="only train, do not start the server")
    parser.add_argument("--host", default="127.0.0.1", help="address the server listens on")
    parser.add_argument("--port", type=int, default=8000, help="port the server listens on")
    args = parser.parse_args(argv)
    out = Path(args.out)
    missing = [n for n in CHARACTERS if not (out / n / "adapter_config.json").is_file()]
    if args.retrain or missing:
        train_all(out, base=args.base, steps=args.steps, lr=args.lr, rank=args.rank,
                  names=list(CHARACTERS) if args.retrain else missing, log=lambda m: print(m, file=sys.stderr))
    if args.no_serve:
        return 0
    from lorakit.cli.serve import main as serve_main

    return serve_main(["--base", args.base, "--adapters", str(out), "--host", args.host, "--port", str(args.port),
                       "--preload", "--title", "lorakit character chat"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

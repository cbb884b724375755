"""A multiple-choice question set planted in a CSV, and a model that answers it as told (for the multiple-choice and
compare tests)."""

from pathlib import Path

import torch

from model.tokenizer import Tokenizer


class Oracle(torch.nn.Module):
    """A model whose logits we control: after "Answer:" it puts all its mass on the letter `answers` names for the
    question being asked (the last one in the prompt), whatever the few-shot examples before it say."""

    def __init__(self, tokenizer: Tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.config = type("Config", (), {"block_size": 2048})()
        self.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(1, 1)})

    def forward(self, idx, input_pos=None, logits_mask=None):
        logits = torch.zeros(*idx.shape, self.tokenizer.vocab_size)
        for row in range(idx.size(0)):
            for t in range(idx.size(1)):
                if logits_mask is not None and not logits_mask[row, t]:
                    continue
                text = self.tokenizer.decode(idx[row, :t + 1])
                if text.endswith("Answer:"):
                    question = text.split("\n\n")[-1].split("\n")[0]
                    letter_id = self.tokenizer.encode(f" {self.answers[question]}", bos=False)[-1]
                    logits[row, t, letter_id] = 20.0
        return logits[logits_mask] if logits_mask is not None else logits


PLANTED = [  # question, choices, answer: 2 to 5 choices, every letter used
    ("Which is a fruit?", ["apple", "chair"], "A"),
    ("Which is a colour?", ["table", "green", "seven"], "B"),
    ("Which is a number?", ["cloud", "river", "twelve", "stone"], "C"),
    ("Which is an animal?", ["spoon", "paper", "glass", "tiger"], "D"),
    ("Which is a planet?", ["mars", "shoe", "lamp", "door", "cake"], "A"),
    ("Which is a metal?", ["wood", "silk", "wool", "clay", "iron"], "E"),
]


def write_csv(path: Path, rows, header: bool = True) -> Path:
    import csv

    with open(path, "w", newline="") as fp:
        writer = csv.writer(fp)
        if header:
            writer.writerow(["question", "A", "B", "C", "D", "answer"])
        for question, choices, answer in rows:
            writer.writerow([question, *choices, answer])
    return path

"""LLM-as-judge: ask a local checkpoint for a 1-10 quality score of an (instruction, response) pair.

Three pieces that the curation pipeline (scripts/curate.py) and the evaluation scripts share:

- `parse_score(text)`: the score out of whatever the judge wrote ("Score: 8/10", "8", "**Rating:** 7.5",
  "I'd give it 9 out of 10"), or None when there is none. Judges, small ones above all, ramble; a parser that
  crashes or guesses on junk would silently bias the filter, so junk is None and the caller decides.
- `judge_prompt(instruction, response)`: the question put to the judge (accuracy, helpfulness, complexity).
- `Judge`: batched greedy scoring with a Forge checkpoint (its reply prefilled with "Score:"), and `ScoreCache`:
  scores appended to a JSONL file keyed by a hash of the judged pair, so a killed run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

JUDGE_SYSTEM = "You are a strict, fair grader of answers written by AI assistants."

JUDGE_TEMPLATE = """Rate the response to the instruction below on a scale of 1 to 10.
Consider accuracy (is it correct?), helpfulness (does it do what was asked?) and complexity (does the task and its answer teach something non-trivial?).
1 means wrong or useless, 5 means acceptable, 10 means excellent.

### Instruction
{instruction}

### Response
{response}

Reply with one line: "Score: N" where N is a number from 1 to 10."""

_WORD_NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10}
_NUMBER = r"(\d+(?:\.\d+)?)"
_OUT_OF = r"\s*(?:/|out\s+of|of)\s*(\d+)"
# "on a scale of 1 to 10", "(1-10)", "from 1 to 10": the scale's bounds are not the score
_SCALE = re.compile(r"(?:(?:on\s+)?(?:a\s+)?scale\s+(?:of|from)\s+)?\(?\b[01]\s*(?:-|–|to)\s*10\b\)?", re.I)
_LABELED = re.compile(r"\b(final\s+|overall\s+|total\s+)?(?:score|rating|grade|rated|rate)\b[^\d\n]{0,20}?"
                      + _NUMBER + rf"(?:{_OUT_OF})?", re.I)
_FRACTION = re.compile(_NUMBER + _OUT_OF + r"\b", re.I)
_GIVE = re.compile(r"\b(?:give|gave|giving|assign|award|score|rate)s?\s+(?:it|this|the\s+(?:response|answer))?\s*"
                   r"(?:an?\s+)?" + _NUMBER + r"(?![\d.]*\s*%)", re.I)
_ALONE = re.compile(r"^\s*" + _NUMBER + r"\s*(?:[.!)]\s*)?(?:$|\n|\s*[-–—:,;]\s)")


def _in_range(value: str, out_of: Optional[str], low: float, high: float) -> Optional[float]:
    score = float(value)
    if out_of is not None:
        denominator = float(out_of)
        if denominator <= 0 or score > denominator:
            return None
        score = score / denominator * high  # "4/5" or "85/100" on the judge's own scale -> ours
    return score if low <= score <= high else None


def parse_score(text: Optional[str], low: float = 1.0, high: float = 10.0) -> Optional[float]:
    """The score a judge's reply gives, in [low, high], or None when it gives none (or only an impossible one).

    Tried in order of how sure they are: a labelled score ("Score: 8/10", "**Rating:** 7.5", the last one wins,
    and one labelled final/overall beats the per-criterion ones), a fraction ("9 out of 10"), a verb ("I'd give
    it 9"), a bare number at the start of the reply ("8", "7.\n..."). A scale's bounds ("on a scale of 1 to 10")
    never count as the score.
    """
    if not isinstance(text, str):
        return None
    text = re.sub(r"[*_`#]+", "", text)
    text = re.sub(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b", lambda m: str(_WORD_NUMBERS[m.group(1).lower()]),
                  text, flags=re.I)
    text = _SCALE.sub(" ", text)

    labeled = [(bool(m.group(1)), m.group(2), m.group(3)) for m in _LABELED.finditer(text)]
    labeled.sort(key=lambda item: item[0])  # stable: the final/overall ones last, each group in reading order
    for _, value, out_of in reversed(labeled):
        score = _in_range(value, out_of, low, high)
        if score is not None:
            return score
    for m in _FRACTION.finditer(text):
        score = _in_range(m.group(1), m.group(2), low, high)
        if score is not None:
            return score
    for pattern in (_GIVE, _ALONE):
        for m in pattern.finditer(text):
            score = _in_range(m.group(1), None, low, high)
            if score is not None:
                return score
    return None


def judge_prompt(instruction: str, response: str, template: str = JUDGE_TEMPLATE) -> str:
    return template.format(instruction=instruction.strip(), response=response.strip())


def pair_key(instruction: str, response: str, judge_id: str) -> str:
    """A stable id for one judgement: the pair, the judge and its prompt (a changed prompt must not reuse scores)."""
    digest = hashlib.sha256()
    for part in (judge_id, instruction, response):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


class ScoreCache:
    """Judge scores appended to a JSONL file as they come (one flushed line per pair), so a killed run loses at
    most the batch in flight. A torn last line (the process died mid-write) is ignored on reload."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.scores: dict[str, dict] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as fp:
                for line in fp:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and "key" in entry:
                        self.scores[entry["key"]] = entry
        self._fp = None

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __getitem__(self, key: str) -> dict:
        return self.scores[key]

    def __len__(self) -> int:
        return len(self.scores)

    def add(self, key: str, score: Optional[float], raw: str) -> None:
        entry = {"key": key, "score": score, "raw": raw}
        self.scores[key] = entry
        if self._fp is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fp = open(self.path, "a", encoding="utf-8")
        self._fp.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._fp.flush()
        os.fsync(self._fp.fileno())

    def close(self) -> None:
        if self._fp is not None:
            self._fp.close()
            self._fp = None


class Judge:
    """Greedy 1-10 scores from a Forge checkpoint or fine-tuning run, many pairs per forward pass (`generate_batch`)."""

    def __init__(self, checkpoint_dir: Path | str, device: str = "auto", precision: Optional[str] = None,
                 max_new_tokens: int = 8, max_prompt_tokens: int = 1536, template: str = JUDGE_TEMPLATE,
                 prefill: str = "Score:") -> None:
        from model.prompts import load_prompt_style
        from model.tokenizer import Tokenizer
        from model.weights.load import load_any

        self.checkpoint_dir = Path(checkpoint_dir)
        loaded = load_any(self.checkpoint_dir, device=device, precision=precision)
        self.tokenizer = Tokenizer(loaded.checkpoint_dir)
        self.style = load_prompt_style(loaded.checkpoint_dir)
        self.model = loaded.model
        self.device = self.model.transformer.wte.weight.device
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = min(max_prompt_tokens, self.model.config.block_size - max_new_tokens)
        self.template = template
        self.prefill = prefill
        self.stop_ids = set(self.tokenizer.stop_ids)
        for stop in self.style.stop_tokens():
            try:
                self.stop_ids.add(self.tokenizer.token_to_id(stop))
            except ValueError:
                pass  # a multi-token stop string; the score line comes first anyway
        setup = f"{max_new_tokens}|{prefill}|{template}"
        self.id = f"{self.checkpoint_dir.resolve()}|{hashlib.sha256(setup.encode()).hexdigest()[:16]}"

    def encode(self, instruction: str, response: str):
        import torch

        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": judge_prompt(instruction, response, self.template)}]
        # The reply is started for the judge ("Score:"), so even a small model's next tokens are the number
        # rather than a restatement of the answer it was asked to grade.
        ids = self.tokenizer.encode(self.style.apply(messages) + self.prefill)
        if ids.numel() > self.max_prompt_tokens:
            # keep the head (instruction) and the tail (the "Reply with Score: N" request); the middle of a long
            # response is what the judge can best do without
            half = self.max_prompt_tokens // 2
            ids = torch.cat([ids[:half], ids[-(self.max_prompt_tokens - half):]])
        return ids.to(self.device)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[Optional[float], str]]:
        """(score or None, the judge's raw reply) for each (instruction, response) pair, judged in one batch."""
        from model.generate import generate_batch

        prompts = [self.encode(instruction, response) for instruction, response in pairs]
        outputs = generate_batch(self.model, prompts, self.max_new_tokens, temperature=0.0, stop_ids=self.stop_ids)
        replies = [(self.prefill + self.tokenizer.decode(ids, skip_special_tokens=True)).strip() for ids in outputs]
        return [(parse_score(reply), reply) for reply in replies]


def score_pairs(judge: Judge, pairs: Iterable[tuple[str, str]], cache: ScoreCache, batch_size: int = 8,
                progress=None) -> list[Optional[float]]:
    """Scores for all pairs, from the cache where it has them, judging the rest `batch_size` at a time."""
    pairs = list(pairs)
    keys = [pair_key(instruction, response, judge.id) for instruction, response in pairs]
    todo = [i for i, key in enumerate(keys) if key not in cache]
    if progress is not None:
        progress.update(len(pairs) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        for i, (score, raw) in zip(batch, judge.score([pairs[i] for i in batch])):
            cache.add(keys[i], score, raw)
        if progress is not None:
            progress.update(len(batch))
    return [cache[key]["score"] for key in keys]

"""On-policy preference pairs: a model's own wrong answers as the rejected side, the gold answer as the chosen one.

Synthetic near-misses teach a model to prefer right over a mistake it may never make; its own sampled answers show
the mistakes it does make (the DPO paper's on-policy setting; "self-play" in SPIN, Chen et al. 2024, uses the
same gold-vs-own-generation pairing). `sample_answers` generates several answers per prompt in batches;
`wrong_answer_pairs` keeps, per prompt, the distinct answers the checker rejects.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from model.generate import generate_batch


@dataclass(frozen=True)
class PromptItem:
    where: str  # names the item in reports, e.g. "train prompt 12 (uppercase)"
    instruction: str  # the user turn, as the model sees it
    gold: str  # the right answer
    system: Optional[str] = None
    task: Optional[str] = None


def sample_answers(model, tokenizer, rendered_prompts: Sequence[str], samples_per_prompt: int, temperature: float,
                   max_new_tokens: int, batch_size: int, seed: int,
                   stop_strings: Sequence[str] = ()) -> list[list[str]]:
    """`samples_per_prompt` answers to each prompt (already rendered in the model's prompt style): the first greedy
    (the answer an exact-match evaluation sees), the others sampled at `temperature` with a seeded generator, so the
    same flags give the same answers. Each answer ends at a stop token or at the first of `stop_strings`."""
    if samples_per_prompt < 1:
        raise ValueError(f"--samples_per_prompt must be at least 1, got {samples_per_prompt}")
    if samples_per_prompt > 1 and temperature <= 0:
        raise ValueError("Sampled answers need --temperature > 0 (with 0 every answer would be the greedy one);"
                         " or use --samples_per_prompt 1")
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    # (prompt index, greedy?) for every answer wanted; greedy and sampled answers decode in separate batches
    wanted = [(i, True) for i in range(len(rendered_prompts))]
    wanted += [(i, False) for i in range(len(rendered_prompts)) for _ in range(samples_per_prompt - 1)]
    answers: list[list[str]] = [[] for _ in rendered_prompts]
    encoded = [tokenizer.encode(prompt).to(device) for prompt in rendered_prompts]
    for start in tqdm(range(0, len(wanted), batch_size), desc="Answering", unit="batch"):
        chunk = wanted[start:start + batch_size]
        for greedy in (True, False):
            part = [index for index, is_greedy in chunk if is_greedy == greedy]
            if not part:
                continue
            outputs = generate_batch(model, [encoded[i] for i in part], max_new_tokens,
                                     temperature=0.0 if greedy else temperature, stop_ids=tokenizer.stop_ids,
                                     generator=None if greedy else generator)
            for index, ids in zip(part, outputs):
                text = tokenizer.decode(ids)
                for marker in stop_strings:
                    text = text.split(marker)[0]
                answers[index].append(text.strip())
    return answers


def wrong_answer_pairs(items: Sequence[PromptItem], answers: Sequence[Sequence[str]],
                       is_right: Callable[[PromptItem, str], bool], max_pairs_per_prompt: int = 1,
                       only_answerable: bool = False) -> tuple[list[tuple], dict[str, int]]:
    """Rows (where, instruction, gold, wrong answer, system, task) for prepare_preferences: for each prompt, up to
    `max_pairs_per_prompt` of its own distinct answers that `is_right` rejects, in the order generated. An answer
    is only ever paired with the prompt it answers, never with the gold answer itself, and a right answer is never
    rejected. With `only_answerable`, a prompt makes pairs only if one of its answers is right: the model can answer
    it, and the pairs push its probability from its wrong answers to the right one, not towards an answer out of its
    reach. Also counts what was left out: right, empty and repeated answers, wrong ones beyond the cap, prompts
    without a wrong answer and (with only_answerable) prompts never answered right."""
    if max_pairs_per_prompt < 1:
        raise ValueError(f"--max_pairs_per_prompt must be at least 1, got {max_pairs_per_prompt}")
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} prompts but {len(answers)} lists of answers")
    rows = []
    counts = {"answers": 0, "right": 0, "empty": 0, "duplicate": 0, "beyond_max_pairs": 0,
              "prompts_without_a_wrong_answer": 0, "prompts_never_answered_right": 0}
    for item, own in zip(items, answers):
        kept: list[str] = []
        right_before = counts["right"]
        for answer in own:
            counts["answers"] += 1
            if not answer.strip():
                counts["empty"] += 1
            elif answer.strip() == item.gold.strip() or is_right(item, answer):
                counts["right"] += 1
            elif answer.strip() in kept:
                counts["duplicate"] += 1
            elif len(kept) < max_pairs_per_prompt:
                kept.append(answer.strip())
            else:
                counts["beyond_max_pairs"] += 1
        if not kept:
            counts["prompts_without_a_wrong_answer"] += 1
        if counts["right"] == right_before:
            counts["prompts_never_answered_right"] += 1
            if only_answerable:
                continue
        suffix = len(kept) > 1
        for number, wrong in enumerate(kept):
            where = f"{item.where}, own answer {number + 1}" if suffix else item.where
            rows.append((where, item.instruction, item.gold, wrong, item.system, item.task))
    return rows, counts

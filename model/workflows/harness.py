"""EleutherAI's lm-evaluation-harness over our GPT: `ForgeLM` implements lm-eval's model interface
(loglikelihood, loglikelihood_rolling, generate_until) in batches, so every lm-eval task runs on a Forge model.
eval/lm_eval_harness.py and eval/compare.py call `evaluate_model`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from model.generate import generate_batch
from model.gpt import GPT
from model.tokenizer import Tokenizer
from model.workflows.evaluate import continuation_logprobs, prefix_token, rolling_windows

# the offline tasks that ship with the eval scripts (eval/lm_eval_tasks/: forge_local), always on the search path
SHIPPED_TASKS = Path(__file__).resolve().parents[2] / "eval" / "lm_eval_tasks"
# the metric that heads a task's line, in this order of preference
HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "word_perplexity", "f1", "mcc")


class ForgeLM(TemplateLM):
    """lm-eval's model interface over our GPT and Tokenizer.

    Tokenization follows lm-eval's own HF model exactly (context and continuation encoded together and split, an
    empty context replaced by BOS, or EOS without one), so the same weights give the same log-likelihoods.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 16, max_gen_toks: int = 256) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.forge_tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._device = model.transformer.wte.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.forge_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.forge_tokenizer)

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.forge_tokenizer.encode(string, bos=add_special_tokens).tolist()

    def tok_decode(self, tokens: list[int]) -> str:
        return self.forge_tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = continuation_logprobs(self.model, pairs, self.batch_size,
                                        desc=None if disable_tqdm else "Scoring loglikelihood requests")
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                windows.append(window)
                owners.append(index)
        # all windows of all documents are batched together, then summed per document
        scores = continuation_logprobs(self.model, windows, self.batch_size,
                                       desc=None if disable_tqdm else "Scoring rolling windows")
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tok_decode([self.eot_token_id]) if self.eot_token_id is not None else None
        results: list[Optional[str]] = [None] * len(requests)
        # requests with the same generation settings are answered together, longest prompts first
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        progress = tqdm(total=len(requests), desc="Running generate_until requests", file=sys.stderr,
                        disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            max_context = self.max_length - max_gen_toks
            if max_context < 1:
                raise ValueError(f"The task asks for {max_gen_toks} generated tokens, as many as the model's context"
                                 f" of {self.max_length}")
            encoded = {i: self.tok_encode(requests[i].args[0])[-max_context:] for i in indices}
            ordered = sorted(indices, key=lambda i: -len(encoded[i]))
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start:start + self.batch_size]
                prompts = [torch.tensor(encoded[i], device=self._device) for i in batch]
                outputs = generate_batch(self.model, prompts, max_gen_toks, temperature=temperature,
                                         top_k=kwargs.get("top_k"), top_p=float(kwargs.get("top_p", 1.0)),
                                         stop_ids={self.eot_token_id} if self.eot_token_id is not None else ())
                for i, ids in zip(batch, outputs):
                    text = postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return results


def parse_tasks(tasks: str, task_manager) -> list[str]:
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise ValueError("--tasks is empty; name one or more lm-eval tasks, e.g. --tasks forge_local")
    known = set(task_manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        from difflib import get_close_matches

        hints = {name: get_close_matches(name, known, n=3) for name in unknown}
        hint = "; ".join(f"{name!r}" + (f" (did you mean {', '.join(m)}?)" if m else "") for name, m in hints.items())
        raise ValueError(f"Unknown lm-eval task {hint}. List them with `lm-eval ls tasks`; local YAML tasks are"
                         f" found with --include_path DIR")
    return names


def headline(results: dict, task: str) -> tuple[str, float]:
    """The main metric of one task (or group) in lm-eval's results: `<task>/<metric>` and its value."""
    metrics = results.get(task, {})
    for name in HEADLINE_METRICS:
        for key, value in metrics.items():
            if key.split(",")[0] == name and isinstance(value, (int, float)):
                return f"{task}/{name}", float(value)
    for key, value in metrics.items():
        if "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{task}/{key.split(',')[0]}", float(value)
    raise ValueError(f"lm-eval returned no numeric metric for {task!r}")


def evaluate_model(model: GPT, tokenizer: Tokenizer, tasks: str = "forge_local", num_fewshot: Optional[int] = None,
                   batch_size: int = 16, limit: Optional[float] = None, include_path: Optional[Path] = None,
                   max_gen_toks: int = 256, seed: int = 1234, bootstrap_iters: int = 1000) -> dict:
    """lm-eval's results for an already loaded model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED_TASKS)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--include_path {include_path} is not a directory of lm-eval YAML tasks")
        paths.append(str(include_path))
    # indexing lm-eval's thousands of task files takes a while: skip it when every task asked for is local
    task_manager = TaskManager(include_path=paths, include_defaults=False)
    requested = [name.strip() for name in tasks.split(",") if name.strip()]
    if not requested or not set(requested) <= set(task_manager.all_tasks):
        task_manager = TaskManager(include_path=paths)
    names = parse_tasks(tasks, task_manager)
    lm = ForgeLM(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return {"tasks": names, "results": output["results"], "groups": output.get("groups", {}),
            "n-shot": output.get("n-shot", {}), "versions": output.get("versions", {}),
            "n-samples": output.get("n-samples", {})}

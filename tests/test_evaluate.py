"""model.workflows.evaluate: continuation scores do not depend on batching and equal a plain forward pass."""

import pytest
import torch

from model.gpt import GPT
from model.tokenizer import Tokenizer
from model.workflows import evaluate as scoring

pytestmark = pytest.mark.usefixtures("one_thread")


def test_continuation_scores_do_not_depend_on_batching(tiny_smollm2_dir):
    model, tokenizer = GPT.from_checkpoint(tiny_smollm2_dir), Tokenizer(tiny_smollm2_dir)
    requests = [scoring.encode_pair(tokenizer, "The capital of France is", " Paris"),
                scoring.encode_pair(tokenizer, "A", " long continuation of several tokens here"),
                (list(range(5, 90)), [7, 8, 9])]  # longer than the context: keeps its last 64 tokens
    one = scoring.continuation_logprobs(model, requests, batch_size=1)
    together = scoring.continuation_logprobs(model, requests, batch_size=3)
    for (a, _), (b, _) in zip(one, together):
        assert a == pytest.approx(b, abs=1e-5)
    # against a plain forward pass of the whole (untruncated) first request
    context, continuation = requests[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context + continuation]))[0, :-1].float(), -1)
    expected = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert one[0][0] == pytest.approx(expected, abs=1e-5)

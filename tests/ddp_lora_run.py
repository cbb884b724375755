"""`finetune/lora.py` with a record of what each rank did, for the DDP and FSDP tests (test_finetune_lora.py,
test_fsdp.py).

    python tests/ddp_lora_run.py RECORD_DIR [finetune/lora.py flags]

Fabric's launcher starts the other ranks by running this same command line again. Every rank writes into
RECORD_DIR its adapter as it stands after training (`rank<N>.safetensors`, gathered to full tensors under FSDP;
DDP must keep it identical across ranks), and in `rank<N>.json` the token ids of the samples it trained on (so the
test can check that the ranks split the data between them), and, at every optimizer step, the frozen parameters
that had a gradient and the trainable ones that had none (both must stay empty). The run itself is exactly
finetune/lora.py's.
"""

import json
import sys
from pathlib import Path

import torch
from conftest import load_script
from safetensors.torch import save_file

from model.cli import run_cli
from model.lora import lora_state_dict
from model.training.fsdp import full_tensors

lora = load_script("finetune/lora.py")
record_dir = Path(sys.argv[1])
flags = sys.argv[2:]
trained_on: list[list[int]] = []
frozen_with_grad: set[str] = set()
trainable_without_grad: set[str] = set()


def recording_loss(model, input_ids, labels, segment_ids=None):
    if torch.is_grad_enabled():  # a training micro-batch, not validation
        for ids, targets in zip(input_ids, labels):
            # a sample ends with its answer: what follows the last label is padding
            trained_on.append(ids[: int((targets != -100).nonzero().max()) + 1].tolist())
    return next_token_loss(model, input_ids, labels, segment_ids)


def recording_train(fabric, state, *args, **kwargs):
    model, optimizer = state["model"], state["optimizer"]
    step = optimizer.step

    def checked_step(*step_args, **step_kwargs):
        for name, param in model.named_parameters():
            if not param.requires_grad and param.grad is not None:
                frozen_with_grad.add(name)
            if param.requires_grad and param.grad is None:
                trainable_without_grad.add(name)
        return step(*step_args, **step_kwargs)

    optimizer.step = checked_step
    train(fabric, state, *args, **kwargs)
    rank = fabric.global_rank
    adapter = dict(full_tensors(lora_state_dict(model.module).items()))
    save_file({key: tensor.contiguous() for key, tensor in adapter.items()}, record_dir / f"rank{rank}.safetensors")
    record = {"world_size": fabric.world_size, "trained_on": trained_on, "frozen_with_grad": sorted(frozen_with_grad),
              "trainable_without_grad": sorted(trainable_without_grad),
              "frozen": sum(not p.requires_grad for p in model.parameters())}
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))


next_token_loss, train = lora.next_token_loss, lora.train
lora.next_token_loss, lora.train = recording_loss, recording_train
run_cli(lora.setup, flags)

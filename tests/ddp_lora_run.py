"""`finetune/lora.py` with a record of what each rank did, for the DDP test in test_finetune_lora.py.

    python tests/ddp_lora_run.py RECORD_DIR [finetune/lora.py flags]

Fabric's launcher starts the other ranks by running this same command line again. Every rank writes into
RECORD_DIR its adapter as it stands after training (`rank<N>.safetensors`, which DDP must keep identical across
ranks) and the token ids of the samples it trained on (`rank<N>.json`), so the test can check that the ranks split
the data between them. The run itself is exactly finetune/lora.py's.
"""

import json
import sys
from pathlib import Path

import torch
from conftest import load_script
from safetensors.torch import save_file

from model.cli import run_cli
from model.lora import lora_state_dict

lora = load_script("finetune/lora.py")
record_dir = Path(sys.argv[1])
flags = sys.argv[2:]
trained_on: list[list[int]] = []


def recording_loss(model, input_ids, labels, segment_ids=None):
    if torch.is_grad_enabled():  # a training micro-batch, not validation
        for ids, targets in zip(input_ids, labels):
            # a sample ends with its answer: what follows the last label is padding
            trained_on.append(ids[: int((targets != -100).nonzero().max()) + 1].tolist())
    return next_token_loss(model, input_ids, labels, segment_ids)


def recording_train(fabric, state, *args, **kwargs):
    train(fabric, state, *args, **kwargs)
    rank = fabric.global_rank
    save_file(lora_state_dict(state["model"].module), record_dir / f"rank{rank}.safetensors")
    record = {"world_size": fabric.world_size, "trained_on": trained_on}
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))


next_token_loss, train = lora.next_token_loss, lora.train
lora.next_token_loss, lora.train = recording_loss, recording_train
run_cli(lora.setup, flags)

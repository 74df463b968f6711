"""``python -m helpers train`` under torchrun, instrumented for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py --audit DIR [--fail-rank R --fail-after N] -- <args>

Each rank records in ``DIR/rank{R}.json`` every file it opened for writing or renamed (a
Python audit hook, so nothing can write unseen) and the sample indices its samplers gave
it. With ``--fail-rank R``, rank R's training images turn to NaN after its first
``--fail-after`` ones: a corrupt batch that must end every rank, not hang them.
"""

import argparse
import atexit
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402
from helpers.__main__ import main  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--audit", required=True)
parser.add_argument("--fail-rank", type=int)
parser.add_argument("--fail-after", type=int, default=8)
args, train_args = parser.parse_known_args()
rank = int(os.environ["RANK"])
record = {"writes": [], "train_indices": {}, "eval_indices": []}


def audit(event, event_args):
    if event == "open" and event_args[1] is not None and any(c in str(event_args[1]) for c in "wax+"):
        record["writes"].append(str(event_args[0]))
    elif event == "os.rename":
        record["writes"].append(str(event_args[1]))


sys.addaudithook(audit)
atexit.register(lambda: Path(args.audit, f"rank{rank}.json").write_text(json.dumps(record)))

sampler_iter = torch.utils.data.DistributedSampler.__iter__


def logged_iter(self):
    indices = list(sampler_iter(self))
    record["train_indices"][str(self.epoch)] = indices
    return iter(indices)


torch.utils.data.DistributedSampler.__iter__ = logged_iter

eval_indices = helpers.ShardedBatchSampler.indices


def logged_indices(self):
    idx = eval_indices(self)
    record["eval_indices"].append(idx.tolist())
    return idx


helpers.ShardedBatchSampler.indices = logged_indices

if args.fail_rank == rank:
    getitem, calls = helpers.H5Dataset.__getitem__, [0]

    def corrupt(self, i):
        x, y = getitem(self, i)
        if self.transform is not None and "HorizontalFlip" in repr(self.transform):  # training data only
            calls[0] += 1
            if calls[0] > args.fail_after:
                x = torch.full_like(x, float("nan"))
        return x, y

    helpers.H5Dataset.__getitem__ = corrupt

sys.exit(main(train_args[1:] if train_args[:1] == ["--"] else train_args))

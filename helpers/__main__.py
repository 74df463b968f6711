"""Command line: ``python -m helpers train --config run.json``, alone or under torchrun.

    # one process (CPU, or the first GPU)
    python -m helpers train --config data-exploration/DFER_GCViT/runs/<run>/run.json
    # 4 GPUs on one machine
    torchrun --standalone --nproc_per_node 4 -m helpers train --config .../run.json
    # 2 machines x 8 GPUs (run on each; node_rank 0 and 1)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint host0:29500 -m helpers train --config .../run.json

The notebook's Train section writes ``run.json``; rerunning that section afterwards loads
the finished folds instead of training them again.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .recipes import run_spec


@record  # under torchrun, a failing rank's traceback goes into torchrun's error summary
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train and test the folds of a run spec (run.json)")
    train.add_argument("--config", required=True, help="run spec written by the notebook (run.json)")
    train.add_argument("--folds", type=int, nargs="+", help="1-based folds to run (default: all)")
    train.add_argument("--device", default="auto", help="auto | cuda | cpu (default: auto)")
    train.add_argument("--timeout-s", type=float, default=600,
                       help="seconds a rank waits for its peers before the run fails (default: 600)")
    train.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args = parser.parse_args(argv)
    run_spec(args.config, args.folds, args.device, args.timeout_s, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())

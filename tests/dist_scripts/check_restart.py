"""`torchrun --max-restarts 1`: attempt 0 fails on rank 1 after the groups exist; attempt 1 must
join afresh (cluster/dist.py's per-attempt store prefix) and pass. Prints 'RESULT rank R: attempt A ok'.

Run with `--prefill 1 --decode 1` under torchrun --max-restarts=1.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from common import say, start
from pd_local.launch import run_guarded


def main() -> None:
    ctx, _ = start(sys.argv[1:])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt == 0 and ctx.rank == 1:
        raise RuntimeError("attempt 0: rank 1 fails on purpose")
    dist.barrier()  # attempt 0: the others wait here until torchrun stops them
    say(ctx, f"attempt {attempt} ok")
    ctx.close()


if __name__ == "__main__":
    run_guarded(main)

"""A torchrun target: ``distill ARGS`` whose every rank dies by SIGKILL right after its Nth sharded checkpoint.

    python -m torch.distributed.run --nproc-per-node 2 fsdpstop.py N ARGS...
"""

import os
import signal
import sys

import distill.pipeline.trainer as trainer


def stop_after(n: int) -> None:
    real, calls = trainer.save_sharded_checkpoint, [0]

    def save(*args, **kwargs):
        path = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:  # as kill -9: no handler, no finally block runs
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    trainer.save_sharded_checkpoint = save


if __name__ == "__main__":
    stop_after(int(sys.argv[1]))
    from distill.cli import main

    main(sys.argv[2:])

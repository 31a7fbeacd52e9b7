"""run.py, except that the process kills itself (SIGKILL) inside the Nth checkpoint save,
after megatron has written its files and before the checkpoint is complete."""

import os
import signal
import sys

if __name__ == "__main__":
    from mimo_train.training import checkpoint

    die_at = int(os.environ["DIE_AT_SAVE"])
    original = checkpoint.dist_checkpointing.save
    calls = []

    def save(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(1)
        if len(calls) == die_at:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.dist_checkpointing.save = save
    from mimo_train.run import main

    sys.exit(main(sys.argv[1:]))

"""`training/pretrain.py` that dies like a preempted job (SIGKILL, no clean-up) at a chosen point, for tests.

    python tests/preempted_pretrain.py --kill_after_step 3 ARGS-OF-pretrain.py      # right after optimizer step 3
    python tests/preempted_pretrain.py --kill_before_commit 4 ARGS-OF-pretrain.py   # step 4's state written, not renamed
"""

import argparse
import os
import signal

from automae_hf.training import pretraining


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hooks_killing_at(kill_after_step: int | None, kill_before_commit: int | None) -> pretraining.TrainingHooks:
    def after_step(step: int) -> None:
        if kill_after_step is not None and step >= kill_after_step:
            die()

    def before_checkpoint_commit(step: int) -> None:
        if step == kill_before_commit:
            die()

    return pretraining.TrainingHooks(after_step=after_step, before_checkpoint_commit=before_checkpoint_commit)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--kill_after_step", type=int, default=None)
    parser.add_argument("--kill_before_commit", type=int, default=None)
    where, pretrain_arguments = parser.parse_known_args()
    pretraining.main(pretrain_arguments, hooks_killing_at(where.kill_after_step, where.kill_before_commit))

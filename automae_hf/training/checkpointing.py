"""Training state saved atomically: `accelerate.save_state` into a temporary folder renamed to `step_N`, so a run
killed at any moment resumes from the last complete checkpoint. Each checkpoint and the run folder hold the run's
arguments (`run_args.json`), so a resume continues only the run it belongs to."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

CHECKPOINTS_FOLDER = "checkpoints"  # under the run's output_dir
LATEST_CHECKPOINT = "latest"  # --resume_from_checkpoint's word for the newest complete checkpoint, in every script
STEP_DIR = re.compile(r"^step_(\d+)$")
RUN_ARGUMENTS_FILE = "run_args.json"  # {"fingerprint": sha256 hex, "arguments": {name: value}}


def arguments_fingerprint(arguments: dict) -> str:
    """sha256 of the arguments as sorted JSON: the same on every machine and library version (a pickle hash is not)."""
    return hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).hexdigest()


def write_run_arguments(folder: Path, arguments: dict) -> None:
    payload = {"fingerprint": arguments_fingerprint(arguments), "arguments": arguments}
    (Path(folder) / RUN_ARGUMENTS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_run_arguments(folder: Path) -> dict | None:
    """The arguments saved in `folder`, or None when it holds no `run_args.json`."""
    path = Path(folder) / RUN_ARGUMENTS_FILE
    return json.loads(path.read_text())["arguments"] if path.is_file() else None


def differing_arguments(saved: dict, current: dict) -> list[str]:
    """Names whose values differ between two argument sets (compared as saved JSON, so tuples equal lists)."""
    saved, current = (json.loads(json.dumps(values, default=str)) for values in (saved, current))
    return sorted(name for name in saved.keys() | current.keys() if saved.get(name) != current.get(name))


class TrainState:
    """Step counter and skip count saved by accelerate's `save_state` via `register_for_checkpointing`, which writes
    rank 0's copy and loads it on every rank: `skipped_images` is therefore the count summed over all processes
    (the training loop folds each process's new skips into it with an all-reduce before every save)."""

    def __init__(self):
        self.completed_steps = 0
        self.skipped_images = 0

    def state_dict(self):
        return {"completed_steps": self.completed_steps, "skipped_images": self.skipped_images}

    def load_state_dict(self, state):
        self.completed_steps = int(state["completed_steps"])
        self.skipped_images = int(state.get("skipped_images", 0))


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The complete `step_N` folder with the largest N (temporary folders of interrupted saves are ignored)."""
    if not checkpoint_root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in checkpoint_root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, total_limit: int | None = None,
                    run_arguments: dict | None = None, before_commit: Callable[[], None] | None = None) -> Path:
    """`save_state` into a temporary folder, then an atomic rename to `step_N`: a run killed while saving leaves the
    previous checkpoint as `latest`. `total_limit` keeps only the newest N complete checkpoints (removed after the
    new one is in place). `run_arguments` are saved beside the state (`run_args.json`). `before_commit` is called
    between the write and the rename (tests: a job preempted mid-save)."""
    final = checkpoint_root / f"step_{step}"
    tmp = checkpoint_root / f".tmp-step_{step}"
    if accelerator.is_main_process:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if run_arguments is not None and accelerator.is_main_process:
        write_run_arguments(tmp, run_arguments)
    accelerator.wait_for_everyone()
    if before_commit is not None:
        before_commit()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            steps = sorted(int(m.group(1)) for p in checkpoint_root.iterdir() if (m := STEP_DIR.match(p.name)))
            for old in steps[:-total_limit]:
                shutil.rmtree(checkpoint_root / f"step_{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final

#!/usr/bin/env python
"""The README's main job: pretrain MAE and AutoMAE on the embedded Fashion-MNIST subset, then show what was
learned (`--help`). The code lives in `automae_hf.training.default_job`."""

from automae_hf.training.default_job import main

if __name__ == "__main__":
    main()

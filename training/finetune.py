#!/usr/bin/env python
"""Finetune an exported encoder for image classification with the HF Trainer (`--help`).
The code lives in `automae_hf.training.finetuning`."""

from automae_hf.training.finetuning import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Push a model folder (pretraining run, encoder, finetuned model) to the Hub (`--help`).
The code lives in `automae_hf.training.hub`."""

from automae_hf.training.hub import main

if __name__ == "__main__":
    main()

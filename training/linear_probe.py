#!/usr/bin/env python
"""Frozen-feature kNN and linear-probe accuracy of an encoder on an HF data set (`--help`).
The code lives in `automae_hf.training.probes`."""

from automae_hf.training.probes import main

if __name__ == "__main__":
    main()

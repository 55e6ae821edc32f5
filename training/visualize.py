#!/usr/bin/env python
"""Pictures of the masks and reconstructions of a pretraining checkpoint (`--help`).
The code lives in `automae_hf.training.visualization`."""

from automae_hf.training.visualization import main

if __name__ == "__main__":
    main()

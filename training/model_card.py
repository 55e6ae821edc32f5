#!/usr/bin/env python
"""Write the model card of a model folder (`--help`). The code lives in `automae_hf.training.model_card`."""

from automae_hf.training.model_card import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""AutoMAE pretraining with Accelerate over Hugging Face datasets (`python training/pretrain.py --help`;
`accelerate launch training/pretrain.py ...` for many processes). The code lives in `automae_hf.training.pretraining`."""

from automae_hf.training.pretraining import main

if __name__ == "__main__":
    main()

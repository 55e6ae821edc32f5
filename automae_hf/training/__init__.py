"""The training library behind the command lines in `training/`: data loading and augmentation (`data`), the
pretraining loop (`pretraining`), atomic checkpoints (`checkpointing`), picture grids (`pictures`,
`visualization`), frozen-feature probes (`probes`), finetuning with the HF Trainer (`finetuning`), encoder export,
model cards and Hub pushes (`export`, `model_card`, `hub`).

Needs the `training` extra (`pip install automae-hf[training]`); `import automae_hf` alone does not import it.
"""

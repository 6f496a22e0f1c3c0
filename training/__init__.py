"""Distributed training: the SPMD train loop (``training.loop``), its config and run directory,
DCP checkpoints, TorchRec evaluation metrics, and launching through torchx."""

"""TorchX components of the muse jobs (``torchx_components/muse.py``: train, evaluate, export, plan)."""

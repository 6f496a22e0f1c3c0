"""Inference: export a run as a torch.package (``inference.export``) and load it (``load_predictor``).

A torch.package runs the code it contains when loaded: load only packages from a trusted source.
"""


def load_predictor(path: str, histories: str | None = None):
    """The ``Predictor`` of the package at ``path``, after checking every checksum (see ``inference.loader``);
    ``histories``: the history store it serves users by id from (default: ``<path>.histories`` if present)."""
    from inference.loader import load_predictor as _load

    return _load(path, histories)

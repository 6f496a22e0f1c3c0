"""Offline capacity planning (``muse plan``): TorchRec's embedding planner on a described cluster, plus the
memory it does not count (the frozen multimodal table, the long sequence), and a fits / does-not-fit verdict."""

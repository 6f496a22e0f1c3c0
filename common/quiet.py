"""Keep third-party chatter (fbgemm load lines, torch.fx notices, known FutureWarnings) out of the
user's terminal at default verbosity; ``-v`` restores it."""

import logging
import os
import warnings

_NOISY_LOGGERS = ("fbgemm_gpu", "torchrec", "torch.distributed", "torch.fx", "torchx", "root", "iopath")


def configure(verbose: bool = False) -> None:
    """Set logging and warning filters for this process and (through the environment) its children."""
    if verbose:
        os.environ["MUSE_VERBOSE"] = "1"
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    os.environ.setdefault("MUSE_VERBOSE", "0")
    if os.environ["MUSE_VERBOSE"] == "1":
        return configure(True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("LOGLEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|torchrec|fbgemm_gpu|torchx|tensordict)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

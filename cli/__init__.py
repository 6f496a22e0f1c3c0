"""The ``muse`` command line."""

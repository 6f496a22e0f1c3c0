"""All file access goes through one iopath PathManager, so other storage handlers plug in
(``register_handler`` with e.g. an S3 or manifold handler)."""

from iopath.common.file_io import PathManager

path_manager = PathManager()


def register_handler(handler) -> None:
    """Add an iopath PathHandler (for a URI prefix such as ``s3://``) used by every reader and writer."""
    path_manager.register_handler(handler)

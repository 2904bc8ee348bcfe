"""Small files shipped with the package (read with importlib.resources, never downloaded)."""

from importlib import resources


def bundled_text() -> bytes:
    """The small English corpus shipped with the package (bytes)."""
    return resources.files(__name__).joinpath("tiny_corpus.txt").read_bytes()

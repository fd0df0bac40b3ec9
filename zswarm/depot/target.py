"""What ``--model`` names: a file on this machine, or a model to find among the peers' files.

Pure apart from looking at the file system; the node asks it before anything binds.
"""

from __future__ import annotations

import os

from .digest import is_sha256

MAX_NAME = 200  # longer is no model name: taken as a path, which says "no such file"


def fetch_target(model: str | None) -> str | None:
    """The model name or SHA-256 (hex, lower case) that ``model`` asks peers for; None when it
    names a file (or is None: the embedded model). A path (a separator, a ``.gguf`` ending) is
    always a file, so a mistyped path says "no such file" rather than starting a fetch."""
    if model is None or os.path.exists(model):
        return None
    text = model.strip()
    if text.lower().startswith("sha256:"):
        text = text[len("sha256:"):]
    if is_sha256(text.lower()):
        return text.lower()
    if os.sep in text or "/" in text or text.lower().endswith(".gguf") or not text or len(text) > MAX_NAME:
        return None
    return text.lower()

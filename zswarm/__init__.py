"""zswarm: a private LLM inference cluster over a few ordinary machines."""

__version__ = "0.1.0"

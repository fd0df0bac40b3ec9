"""The node's actors, one module each; :mod:`zswarm.node` starts and stops them in order."""

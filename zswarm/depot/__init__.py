"""Models travel: a node that lacks a model file fetches it from the peers that hold it.

- :mod:`.digest`: a file's content name (SHA-256 of the whole file) and its pieces' hashes,
  computed once and cached in the state directory.
- :mod:`.store`: the models directory (what was fetched, and the partial fetch that resumes).
- :mod:`.shelf`: the holder's side: answers manifest and piece queries in the gateway's io
  thread, at a bounded share rate, from whole, verified files only.
- :mod:`.plan`: the fetcher's rules (which piece from which peer, strikes, liars): pure.
- :mod:`.fetcher`: the Depot actor, which drives a plan over its own CURVE socket.

A file is named by content, so a holder cannot lie about what it serves without being found
out: every piece is checked against the manifest as it arrives, and the whole file against
the digest before anything uses it.
"""

"""The inference engine: a child process that loads one model and answers GenRequests.

The node never loads a model itself (llama.cpp can abort the whole process, for example when
an RPC worker disappears). :mod:`zswarm.engine.proc` is the child's main; the node's
RPCSupervisor starts it and waits for its ``READY <model name>`` line. :mod:`zswarm.engine.model`
says where the default model lives and what a model file is called on the wire; it never
imports llama_cpp, so the node may use it.
"""

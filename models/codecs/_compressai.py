"""CompressAI's entropy bottleneck, imported without the rest of CompressAI.

``import compressai`` runs a package ``__init__`` that imports every CompressAI module:
image datasets and transforms (torchvision), point-cloud layers (einops, pandas,
torch-geometric), MS-SSIM losses (pytorch-msssim). PyPI's torchvision for torch 2.13 is a
CUDA build that cannot load next to the CPU torch, and CompressAI 1.2.8 declares
``numpy<2``, which conflicts with the numpy everything else here uses. The learned codec
needs only ``compressai.entropy_models`` (torch, numpy, scipy and CompressAI's own C++
extensions ``_CXX`` and ``ans``), so CompressAI is installed with ``--no-deps`` and this
module registers the ``compressai`` package *without running its __init__*, then imports
the entropy models normally. What the package ``__init__`` would define and the entropy
models call (the entropy-coder choice) is defined here to CompressAI's default, rANS.

Where CompressAI was already imported in full (an environment with its dependencies),
that import is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

from edgeswarm.placement.errors import RuntimeNotAvailable

#: CompressAI's default entropy coder: its rANS (``compressai.ans``).
ENTROPY_CODER = "ans"
INSTALL_HINT = "install it with: pip install --no-deps compressai==1.2.8 (see docs/compression.md)"
_lock = threading.Lock()


def entropy_models() -> ModuleType:
    """``compressai.entropy_models``; RuntimeNotAvailable when CompressAI is missing."""
    with _lock:
        if "compressai" not in sys.modules:
            spec = importlib.util.find_spec("compressai")
            if spec is None or spec.submodule_search_locations is None:
                raise RuntimeNotAvailable(f"the learned codec needs CompressAI; {INSTALL_HINT}")
            package = importlib.util.module_from_spec(spec)  # its __init__ is not run
            package.__dict__.update(_entropy_coder_api())
            sys.modules["compressai"] = package
        try:
            return importlib.import_module("compressai.entropy_models")
        except ImportError as exc:
            raise RuntimeNotAvailable(
                f"CompressAI's entropy models cannot load ({exc}); {INSTALL_HINT}") from exc


def _entropy_coder_api() -> dict[str, Any]:
    def get_entropy_coder() -> str:
        return ENTROPY_CODER

    def available_entropy_coders() -> list[str]:
        return [ENTROPY_CODER]

    return {"get_entropy_coder": get_entropy_coder,
            "available_entropy_coders": available_entropy_coders}

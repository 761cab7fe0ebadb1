"""The trained policy on disk: ``giph.safetensors`` (weights) + ``giph.json`` (the rest).

The JSON holds what is needed to rebuild the network (architecture, feature widths and
normalisation), how the search uses it, and how it was trained (settings and final
metrics). Weights are read with safetensors only: no pickle is ever loaded. A loaded
model is cached per directory, so every plan after the first skips the disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from edgeswarm.placement.errors import ModelFileError
from edgeswarm.placement.gnn.improve import SearchConfig
from edgeswarm.placement.gnn.network import GROUPS, GiphNet, NetConfig

FORMAT = "edgeswarm.giph/1"
WEIGHTS = "giph.safetensors"
CONFIG = "giph.json"
#: the shipped checkpoint
DEFAULT_DIR = Path(__file__).resolve().parent

FIX = "run 'edgeswarm placement train --out DIR' to write a fresh one"


@dataclass
class Model:
    net: GiphNet
    search: SearchConfig
    meta: dict[str, Any]


_cache: dict[tuple[str, int, int], Model] = {}


def save(out_dir: Path, net: GiphNet, search: SearchConfig,
         meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write the weights and the JSON description into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "network": net.cfg.to_json(), "search": search.to_json(),
           "features": dict(GROUPS), "normalisation": net.normalisation(), **meta}
    config = out_dir / CONFIG
    config.write_text(json.dumps(doc, indent=2) + "\n")
    return weights, config


def load(path: Path | str = DEFAULT_DIR) -> Model:
    """The model in directory ``path`` (or the directory of a given ``giph.*`` file)."""
    where = Path(path)
    if where.suffix in (".json", ".safetensors"):
        where = where.parent
    weights, config = where / WEIGHTS, where / CONFIG
    try:
        key = (str(where.resolve()), os.stat(weights).st_mtime_ns, os.stat(config).st_mtime_ns)
    except OSError:
        raise ModelFileError(f"GNN placement checkpoint missing in {where} (need {WEIGHTS} "
                             f"and {CONFIG}); {FIX}") from None
    model = _cache.get(key)
    if model is None:
        model = _read(weights, config)
        _cache.clear()  # one checkpoint in use at a time; a retrained one replaces it
        _cache[key] = model
    return model


def _read(weights: Path, config: Path) -> Model:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        doc = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{config} is not readable JSON ({exc}); {FIX}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{config} is not an {FORMAT} file; {FIX}")
    if doc.get("features") != dict(GROUPS):
        raise ModelFileError(f"{config} was trained on other features ({doc.get('features')}) "
                             f"than this version computes ({dict(GROUPS)}); {FIX}")
    try:
        net = GiphNet(NetConfig(**_known(NetConfig, doc.get("network", {}))))
        search = SearchConfig(**_known(SearchConfig, doc.get("search", {})))
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{config} has a bad network or search section ({exc}); "
                             f"{FIX}") from None
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError, ValueError) as exc:
        raise ModelFileError(f"{weights} is not a readable safetensors file ({exc}); "
                             f"{FIX}") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelFileError(f"{weights} does not match the network in {config} ({first}); "
                             f"{FIX}") from None
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise ModelFileError(f"{weights} holds non-finite weights; {FIX}")
    net.eval()
    meta = {k: v for k, v in doc.items()
            if k not in ("format", "network", "search", "features", "normalisation")}
    return Model(net, search, meta)


def _known(cls: type, section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise TypeError(f"expected an object, got {type(section).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(section) - names
    if unknown:
        raise TypeError(f"unknown field(s) {sorted(unknown)}")
    return dict(section)

"""edgeswarm: deploy neural networks onto a dynamic cluster of edge and mobile devices.

The front door::

    import edgeswarm as es
    cluster = es.Cluster.discover(cluster="lab")       # or es.Cluster.connect(broker=...)
    plan = cluster.place("scene-cnn", policy="gnn")
    with cluster.deploy("scene-cnn", plan) as deployment:
        y = deployment.run(x)
    exe = es.compile("digits-cnn", runtime="onnx-int8")  # single-device use

``Cluster``, ``Deployment``, ``Plan`` and ``Testbed`` are imported on first use, so
``import edgeswarm`` stays light on a small device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeswarm.placement.errors import (
    DeviceLost,
    Error,
    InvalidInput,
    ModelFileError,
    PlacementInfeasible,
    ProtocolError,
    RuntimeNotAvailable,
    UnknownModel,
)
from edgeswarm.placement.taskgraph import TaskGraph

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgeswarm.cluster import Cluster
    from edgeswarm.deployment import Deployment
    from edgeswarm.models.runtimes import Executable
    from edgeswarm.placement.plan import Plan

_LAZY = {"Cluster": "edgeswarm.cluster", "Deployment": "edgeswarm.deployment",
         "Plan": "edgeswarm.placement.plan"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeswarm' has no attribute {name!r}")


def compile(model: Any, runtime: str = "onnx", example_inputs: Any = None,
            output: Any = None, calibration: Any = None) -> Executable:
    """Compile a zoo name, an ``nn.Module`` or an ``.onnx`` path for one runtime.

    See :func:`edgeswarm.models.runtimes.compile`.
    """
    from edgeswarm.models.runtimes import compile as _compile

    return _compile(model, runtime=runtime, example_inputs=example_inputs, output=output,
                    calibration=calibration)


__all__ = [
    "Cluster",
    "Deployment",
    "DeviceLost",
    "Error",
    "InvalidInput",
    "ModelFileError",
    "PlacementInfeasible",
    "Plan",
    "ProtocolError",
    "RuntimeNotAvailable",
    "TaskGraph",
    "UnknownModel",
    "__version__",
    "compile",
]

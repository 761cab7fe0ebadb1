"""edgeswarm: deploy neural networks onto a dynamic cluster of edge and mobile devices.

The front door. Single-device use today::

    import edgeswarm as es
    exe = es.compile("digits-cnn", runtime="onnx-int8")
    logits = exe.run(inputs)
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
    from edgeswarm.models.runtimes import Executable


def compile(model: Any, runtime: str = "onnx", example_inputs: Any = None,
            output: Any = None, calibration: Any = None) -> Executable:
    """Compile a zoo name, an ``nn.Module`` or an ``.onnx`` path for one runtime.

    See :func:`edgeswarm.models.runtimes.compile`.
    """
    from edgeswarm.models.runtimes import compile as _compile

    return _compile(model, runtime=runtime, example_inputs=example_inputs, output=output,
                    calibration=calibration)


__all__ = [
    "DeviceLost",
    "Error",
    "InvalidInput",
    "ModelFileError",
    "PlacementInfeasible",
    "ProtocolError",
    "RuntimeNotAvailable",
    "TaskGraph",
    "UnknownModel",
    "__version__",
    "compile",
]

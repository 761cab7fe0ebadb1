"""Pure planning: task graphs, device clusters, plans, the cost model and policies.

Nothing here touches a socket, a process or the clock.
"""

from edgeswarm.placement.errors import Error, InvalidInput, PlacementInfeasible
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

__all__ = ["Edge", "Error", "InvalidInput", "PlacementInfeasible", "Task", "TaskGraph", "TaskId"]

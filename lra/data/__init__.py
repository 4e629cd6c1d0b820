"""LRA data: task registry and grain input pipelines.

`TaskInfo`, `task_info` and `TASK_NAMES` are static and import no data libraries; `Task` and
`get_task` load the pipelines (grain, Pillow, TFDS) on first use, so code that only sizes a task
(`lra.build`'s trainer, `benchmarks.model_step`) runs where those are not installed.
"""
import importlib
from typing import Any

from lra.data.info import TASK_NAMES, TaskInfo, task_info

_LAZY = {'Task': 'lra.data.pipeline', 'get_task': 'lra.data.registry'}

__all__ = ['TASK_NAMES', 'Task', 'TaskInfo', 'get_task', 'task_info']


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(_LAZY[name]), name)

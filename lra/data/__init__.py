"""LRA data: task registry and tf.data input pipelines."""
from lra.data.info import TaskInfo
from lra.data.pipeline import Task
from lra.data.registry import TASK_NAMES, get_task, task_info

__all__ = ['TASK_NAMES', 'Task', 'TaskInfo', 'get_task', 'task_info']

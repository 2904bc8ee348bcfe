"""The Long Range Arena: task specs and datasets (the `efformer arena` runner lives beside them)."""

from efformer.arena.tasks import PAPER_TABLE1, TASKS, TaskSpec, build_datasets, get_task

__all__ = ["PAPER_TABLE1", "TASKS", "TaskSpec", "build_datasets", "get_task"]

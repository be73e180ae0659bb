"""Data only: the task and checkpoint registry (registry.json) and a model card per task (cards/)."""

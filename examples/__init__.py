"""Runnable examples of jfocal; `examples.retinanet` is importable from the repository root."""

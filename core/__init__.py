"""Verticals shared ML core: models, training, quantized runtime, continual learning and the platform
plumbing (settings, database, queue, job progress) that every solution stands on.

`core` never imports `solutions`.
"""

__version__ = "0.1.0"

"""Grove: hardware-aware model optimization as a cached Prefect DAG."""

__version__ = "0.1.0"

"""Callbacks of lit_parallel."""

from lit_parallel.callbacks.comm_monitor import CommunicationMonitor
from lit_parallel.callbacks.elastic import ElasticResume
from lit_parallel.callbacks.head_pruning import AttentionHeadPruning, load_pruned
from lit_parallel.callbacks.magnitude_pruning import MagnitudePruning
from lit_parallel.callbacks.model_summary import ModelSummary
from lit_parallel.callbacks.preemption import Preempted, Preemption
from lit_parallel.callbacks.pruning import export_pruned
from lit_parallel.callbacks.resume import ExactResume
from lit_parallel.callbacks.structured_pruning import StructuredPruning
from lit_parallel.callbacks.summary import RunSummary

__all__ = [
    "AttentionHeadPruning",
    "CommunicationMonitor",
    "ElasticResume",
    "ExactResume",
    "MagnitudePruning",
    "ModelSummary",
    "Preempted",
    "Preemption",
    "StructuredPruning",
    "export_pruned",
    "load_pruned",
    "RunSummary",
]

"""The router's fair queue: priority lanes, tenant fairness by tokens served, bounded waits."""

from meshllm.router.fairqueue.fair import FairQueue, Waiter
from meshllm.router.fairqueue.gate import AdmissionQueue, QueueMetrics, Ticket

__all__ = ["AdmissionQueue", "FairQueue", "QueueMetrics", "Ticket", "Waiter"]

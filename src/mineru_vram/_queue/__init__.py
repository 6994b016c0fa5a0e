"""``TaskQueue``: a durable queue of documents, parsed one by one on one long-lived session.

A web front end or a batch service receives documents faster than the GPU parses
them. The queue takes them (``submit`` copies each input into the queue's own
folder and returns at once), a worker loop parses them on one resident session
(``run``, ``arun``, or ``mineru-vram worker tasks.db``), and callers ask for
``status`` or wait for the ``result``.

The package, by owner:

* :mod:`.records`: the public records (:class:`TaskStatus`, :class:`TaskInfo`,
  :class:`QueueSettings`, :class:`WorkerStats`) and a worker's claim.
* :mod:`.store`: the SQL (schema, submit, claim, lease renewal, complete, fail,
  recover, sweep, events); it explains the exactly-once rules.
* :mod:`.files`: the folder beside the database (inputs, staged and stored
  results, worker locks), private to its user, and the database file's safety.
* :mod:`.results`: the stored result format (JSON and raw image bytes: reading it
  cannot run code).
* :mod:`.worker`: the loop that claims, parses and records, and its heartbeat.
* :mod:`.queue`: :class:`TaskQueue`, the facade, and :func:`serve`, the worker
  command's body (its arguments are parsed in ``_cli``).

Exactly once, and nothing lost, under kill -9: a task is claimed in one
transaction under a fresh lease token; a worker's heartbeat renews its leases and
its lock file marks it alive; a task whose lease expired or whose worker died is
recovered at the next claim; a completion only counts while the task is still held
under the same token; files written but not yet recorded are swept when a worker
starts.
"""

from mineru_vram._exceptions import ResultTimeoutError, TaskCancelledError, TaskFailedError, TaskNotFoundError

from .queue import TaskQueue, serve
from .records import QueueSettings, TaskInfo, TaskStatus, WorkerStats

__all__ = [
    "QueueSettings",
    "ResultTimeoutError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskQueue",
    "TaskStatus",
    "WorkerStats",
    "serve",
]

"""Process isolation: a session's models live in a supervised worker process.

Split by side, as pytest-xdist splits ``workermanage.py`` and ``remote.py``:

* ``protocol.py``: the named messages both sides exchange, and how large payloads
  (documents, results) travel through files instead of the pipe.
* ``runner.py``: the parent side, :class:`~mineru_vram._worker.runner.WorkerRunner`,
  which starts, supervises, recycles and stops workers; with ``handle.py`` (one worker
  process and its pipe, startable ahead of its settings) and ``device.py`` (NVML
  checks that the device got a stopped worker's memory back).
* ``child.py``: the worker's side, run like ``python -I -m mineru_vram._worker.child``;
  it imports nothing from ``runner.py``.

This package's ``__init__`` imports neither side: the child imports the package
first, and must not pull in the parent's code with it.
"""

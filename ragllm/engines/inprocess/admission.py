"""How many requests the engine holds (generating or queued), bounded: a request past
``max_num_seqs + max_waiting`` is refused at once (503, retry shortly) rather than queued without end.
Counted from the event loop and, through a stream's close, from any thread: hence the lock."""

from __future__ import annotations

import threading

from ragllm.errors import EngineOverloaded


class AdmissionCounter:
    def __init__(self, max_num_seqs: int, max_waiting: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.count = 0
        self._lock = threading.Lock()

    def reserve(self) -> None:
        """Count one more request, or raise EngineOverloaded at capacity."""
        with self._lock:
            if self.count >= self.max_num_seqs + self.max_waiting:
                raise EngineOverloaded(
                    f"the engine is at capacity ({self.max_num_seqs} running, "
                    f"{self.max_waiting} waiting); retry shortly"
                )
            self.count += 1

    def release(self) -> None:
        with self._lock:
            self.count -= 1

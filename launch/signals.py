"""Stop requests: SIGUSR1 (a Slurm time limit, ``--signal=B:USR1@grace``) or SIGTERM
(preemption, ``scancel``) become a flag the training loop reads between steps; the loop then
saves a checkpoint and exits, and the job is requeued (see ``eoforge.launch.slurm``)."""

from __future__ import annotations

import signal


class StopRequest:
    """Turns SIGUSR1/SIGTERM into a flag the loop checks after each step (save, then exit)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

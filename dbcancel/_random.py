"""The library's own random source, for jitter and retry backoff.

Background threads (heartbeat, watcher) draw from it while the application runs, so it
must not be the global `random` module: drawing from that would move the state of an
application or a test that seeded it (hypothesis, for one, fails a test whose global
random state changes while it generates data). A forked child reseeds, so processes
forked together do not jitter in lockstep.
"""

from __future__ import annotations

import os
import random

__all__ = ["rng"]

rng = random.Random()

os.register_at_fork(after_in_child=rng.seed)

"""The switch moe_fx's trace-time substitutions (`hf_experts`, `opaque_experts`) test before acting.

It is on while some thread is inside `on()`. Patches stay installed; they act only while the switch is on
and Dynamo is tracing, so other threads and other backends see the original code except while a moe_fx
capture runs somewhere."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable


class CaptureSwitch:
    def __init__(self, install: Callable[[], object]):
        self._install = install  # runs under the lock on every entry (it does its own once-only work)
        self.lock = threading.Lock()
        self.active = 0

    @contextlib.contextmanager
    def on(self):
        with self.lock:
            self._install()
            self.active += 1
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1

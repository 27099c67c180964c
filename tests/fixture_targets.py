"""Small misbehaving targets for testing the runner and CLI (not the properties: see mutants.py)."""

from __future__ import annotations

import os
import signal
import time

from properties.targets.reference import ReferenceHandle, ReferenceTarget


class _ScaledDeltaHandle(ReferenceHandle):
    """Merges 1% too much: every merge-related number is wrong, the unmerged forward is right."""

    def merge(self, *, adapter_names=None, safe=False):
        for name in self.spec.active_adapters if adapter_names is None else adapter_names:
            self.layer.scaling[name] *= 1.01
        super().merge(adapter_names=adapter_names, safe=safe)


class ScaledDeltaTarget(ReferenceTarget):
    def __init__(self):
        super().__init__()
        self.name = "scaled-delta"

    def build(self, spec):
        return _ScaledDeltaHandle(spec, False)


class _CrashHandle(ReferenceHandle):
    def forward(self, x, **kw):
        raise RuntimeError("boom from deep inside the library")


class CrashTarget(ReferenceTarget):
    def __init__(self):
        super().__init__()
        self.name = "crash"

    def build(self, spec):
        return _CrashHandle(spec, False)


class _HangHandle(ReferenceHandle):
    def forward(self, x, **kw):
        time.sleep(30)
        return super().forward(x, **kw)


class HangTarget(ReferenceTarget):
    def __init__(self):
        super().__init__()
        self.name = "hang"

    def build(self, spec):
        return _HangHandle(spec, False)


class _SegfaultHandle(ReferenceHandle):
    """Dies like a native kernel with a bad pointer: SIGSEGV in the forward (from the 2nd example on)."""

    calls = 0

    def forward(self, x, **kw):
        type(self).calls += 1
        if type(self).calls > 1:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().forward(x, **kw)


class _ExitHandle(ReferenceHandle):
    """A dependency that calls ``os._exit`` (no exception, no cleanup) in merge."""

    def merge(self, *, adapter_names=None, safe=False):
        os._exit(3)


class _NativeHangHandle(ReferenceHandle):
    """A hang in native code that never returns to the interpreter: the alarm is blocked."""

    def forward(self, x, **kw):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)
        return super().forward(x, **kw)


class _FixtureTarget(ReferenceTarget):
    """The reference with another handle class."""

    def __init__(self, name, handle):
        super().__init__()
        self.name, self.handle = name, handle

    def build(self, spec):
        return self.handle(spec, False)


class _SlowHandle(ReferenceHandle):
    def forward(self, x, **kw):
        time.sleep(0.3)
        return super().forward(x, **kw)


class SlowTarget(ReferenceTarget):
    """Correct but slow: gives a test time to interrupt a run between cells."""

    def __init__(self):
        super().__init__()
        self.name = "slow"

    def build(self, spec):
        return _SlowHandle(spec, False)


class _RsloraMergeHandle(ReferenceHandle):
    """A bug that only rsLoRA adapters have: their merge adds 1% too much. Everything else is right."""

    def merge(self, *, adapter_names=None, safe=False):
        for name in self.spec.active_adapters if adapter_names is None else adapter_names:
            if self.spec.adapter(name).use_rslora:
                self.layer.scaling[name] *= 1.01
        super().merge(adapter_names=adapter_names, safe=safe)


class RsloraMergeTarget(ReferenceTarget):
    def __init__(self):
        super().__init__()
        self.name = "rslora-merge"

    def build(self, spec):
        return _RsloraMergeHandle(spec, False)


SCALED = ScaledDeltaTarget()
RSLORA_MERGE = RsloraMergeTarget()
CRASH = CrashTarget()
HANG = HangTarget()
SLOW = SlowTarget()
SEGFAULT = _FixtureTarget("segfault", _SegfaultHandle)
EXIT = _FixtureTarget("exit", _ExitHandle)
NATIVE_HANG = _FixtureTarget("native-hang", _NativeHangHandle)

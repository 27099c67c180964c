"""Small misbehaving targets for testing the runner and CLI (not the properties: see mutants.py)."""

from __future__ import annotations

import os
import signal
import time

import torch

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
    """Dies like a native kernel with a bad pointer: SIGSEGV in a forward of more than one element
    (so the first, minimal example passes and a later one crashes)."""

    def forward(self, x, **kw):
        if x.numel() > 1:
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


class _BadOutputHandle(ReferenceHandle):
    """A right forward spoiled one way (``BAD``): a NaN or +Inf entry, a dropped row, float64, meta."""

    bad = "nan"

    def forward(self, x, **kw):
        y = super().forward(x, **kw)
        flat = y.reshape(-1)
        if self.bad == "nan":
            flat[-1] = float("nan")
        elif self.bad == "inf":
            flat[-1] = float("inf")
        elif self.bad == "shape":
            return y.reshape(-1)[:-1]
        elif self.bad == "dtype":
            return y.double() if y.dtype != torch.float64 else y.float()
        elif self.bad == "device":
            return y.to("meta")
        return y


def _bad_output(kind):
    return type(f"_Bad{kind.title()}Handle", (_BadOutputHandle,), {"bad": kind})


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
NAN = _FixtureTarget("nan", _bad_output("nan"))
INF = _FixtureTarget("inf", _bad_output("inf"))
BAD_SHAPE = _FixtureTarget("bad-shape", _bad_output("shape"))
BAD_DTYPE = _FixtureTarget("bad-dtype", _bad_output("dtype"))
BAD_DEVICE = _FixtureTarget("bad-device", _bad_output("device"))

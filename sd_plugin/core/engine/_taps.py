"""The only hook code of sd_plugin: persistent, per-thread taps on a model's exit points.

:class:`ExitEngine` registers one forward hook (or pre-hook) per exit point once,
when it is built. A hook does nothing unless the *calling thread* has opened a
session (:meth:`ExitEngine.capture`, :meth:`ExitEngine.run_segment`,
:meth:`ExitEngine.intercept`), so the model computes exactly what it computed
before, costs one Python call per tapped module when no session is open, and one
engine serves many threads at once: sessions live in thread-local storage and no
hook is added or removed per call.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._points import ExitPoint, StopForward, replace_feature, select_feature, tap_module

__all__ = ["ExitEngine", "Capture", "InterceptFn"]

#: ``fn(k, feature, value)`` called at exit point ``k`` with the selected feature and the hooked value (the
#: module's output, or its input tuple for a pre-hook). It returns None (the model goes on unchanged), a
#: replacement for the value (e.g. only the samples that go on), or raises :class:`StopForward`.
InterceptFn = Callable[[int, torch.Tensor, Any], Any]


class Capture:
    """Features recorded at every tapped point during one forward pass (see :meth:`ExitEngine.capture`)."""

    def __init__(self, points: Sequence[ExitPoint]) -> None:
        self.points = tuple(points)
        self._values: Dict[int, torch.Tensor] = {}

    def record(self, k: int, value: Any) -> None:
        if k in self._values:
            raise RuntimeError(
                f"exit point {self.points[k].module!r} ran more than once in one forward pass; an exit needs a "
                "module that runs once per pass (choose other exit indices or stage_modules)."
            )
        feature = select_feature(value, self.points[k])
        self._values[k] = feature.clone() if self.points[k].copy else feature

    @property
    def features(self) -> List[torch.Tensor]:
        """One tensor per tapped point, in point order (exit points first, then any extra points)."""
        missing = [p.module for i, p in enumerate(self.points) if i not in self._values]
        if missing:
            raise RuntimeError(
                f"the forward pass never ran the tapped module(s) {missing}: they are not on this "
                "model's forward path. Choose other exit indices."
            )
        return [self._values[i] for i in range(len(self.points))]


class _Session:
    def on_point(self, k: int, value: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class _CaptureSession(_Session):
    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def on_point(self, k: int, value: Any) -> Any:
        self.capture.record(k, value)
        return None


class _SegmentSession(_Session):
    """Hands ``value`` on in place of point ``start``'s feature; records point ``stop``'s and ends the pass there."""

    def __init__(
        self, capture: Capture, start: Optional[int], value: Optional[torch.Tensor], stop: Optional[int]
    ) -> None:
        self.capture = capture
        self.start, self.value, self.stop = start, value, stop
        self.started = start is None

    def on_point(self, k: int, value: Any) -> Any:
        if k == self.stop:
            self.capture.record(k, value)
            raise StopForward
        if k == self.start and self.value is not None:
            self.started = True
            return replace_feature(value, self.capture.points[k], self.value)
        return None


class _InterceptSession(_Session):
    def __init__(self, engine: ExitEngine, fn: InterceptFn) -> None:
        self.engine = engine
        self.fn = fn

    def on_point(self, k: int, value: Any) -> Any:
        if k >= self.engine.num_exit_points:
            return None  # extra points (e.g. the teacher) are not exits
        return self.fn(k, select_feature(value, self.engine.points[k]), value)


class _TapHook:
    """A hook object (not a closure), so ``copy.deepcopy`` and pickling of the model keep it bound to the copy."""

    def __init__(self, engine: ExitEngine, k: int) -> None:
        self.engine = engine
        self.k = k

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> Any:
        session = self.engine._active()
        if session is None:
            return None
        value = args if self.engine.points[self.k].hook == "forward_pre" else output
        return session.on_point(self.k, value)


class ExitEngine:
    """Persistent taps on ``root``'s exit points (and optional extra points, e.g. the teacher features).

    Args:
        root: The module whose submodules the points name.
        points: The exit points, shallowest first.
        extra: More points to record in :meth:`capture` (after the exits), never intercepted.

    Example:
        >>> engine = ExitEngine(model, points)
        >>> with engine.capture() as cap:
        ...     logits = model(x)
        >>> feats = cap.features
        >>> f1 = engine.run_to(0, lambda: model(x))  # stops the forward right after exit point 0
        >>> f2 = engine.run_segment(lambda: model(x), start=0, value=f1, stop=1)  # exit point 0 to point 1
    """

    def __init__(self, root: nn.Module, points: Sequence[ExitPoint], extra: Sequence[ExitPoint] = ()) -> None:
        self.root = root
        self.num_exit_points = len(points)
        self.points: Tuple[ExitPoint, ...] = (*points, *extra)
        self._local = threading.local()
        self._installed = False
        self.install()

    # hooks --------------------------------------------------------------------------------------------------------
    def _modules(self) -> List[nn.Module]:
        return [tap_module(self.root, p) for p in self.points]

    def _ours(self, hooks: Dict[int, Any]) -> List[int]:
        return [i for i, h in hooks.items() if isinstance(h, _TapHook) and h.engine is self]

    @property
    def installed(self) -> bool:
        return all(
            self._ours(m._forward_pre_hooks if p.hook == "forward_pre" else m._forward_hooks)
            for p, m in zip(self.points, self._modules())
        )

    def ensure_installed(self) -> None:
        """Re-register the taps if :meth:`remove` took them off (cheap when they are on)."""
        if not self._installed:
            self.install()

    def install(self) -> None:
        """Register the taps (idempotent)."""
        self._installed = True
        for k, (point, module) in enumerate(zip(self.points, self._modules())):
            hooks = module._forward_pre_hooks if point.hook == "forward_pre" else module._forward_hooks
            if any(getattr(hooks[i], "k", None) == k for i in self._ours(hooks)):
                continue
            if point.hook == "forward_pre":
                module.register_forward_pre_hook(_TapHook(self, k))
            else:
                module.register_forward_hook(_TapHook(self, k))

    def remove(self) -> None:
        """Remove every tap of this engine from the model (the model is then exactly as before)."""
        self._installed = False
        for module in {id(m): m for m in self._modules()}.values():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for i in self._ours(hooks):
                    del hooks[i]

    # sessions -----------------------------------------------------------------------------------------------------
    def _active(self) -> Optional[_Session]:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    @contextlib.contextmanager
    def _session(self, session: _Session) -> Iterator[None]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(session)
        try:
            yield
        finally:
            stack.pop()

    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record every point's feature during the forward pass run inside the block (this thread only)."""
        cap = Capture(self.points)
        with self._session(_CaptureSession(cap)):
            yield cap

    def _check_point(self, k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.points):
            raise ValueError(f"exit point {k!r} is out of range: this model has points 0..{len(self.points) - 1}.")

    def _never_reached(self, k: int) -> RuntimeError:
        return RuntimeError(f"the forward pass never reached exit point {self.points[k].module!r}.")

    def run_segment(
        self,
        forward: Callable[[], Any],
        *,
        start: Optional[int] = None,
        value: Optional[torch.Tensor] = None,
        stop: Optional[int] = None,
    ) -> Any:
        """Run ``forward()`` from point ``start`` to point ``stop`` (0-based; this thread only).

        Args:
            forward: Runs the model (on any input of the right shape when ``start`` is given).
            start: The point whose feature ``value`` replaces: the model hands ``value`` on from there, so what it
                computed before that point does not reach the result. None: from the model's input.
            value: The feature handed on at ``start`` (required with it).
            stop: The point whose feature is returned; the pass ends there and later modules do not run. None:
                ``forward()``'s own result is returned.
        """
        for k in (start, stop):
            if k is not None:
                self._check_point(k)
        if (start is None) != (value is None):
            raise ValueError("run_segment needs both start and value, or neither.")
        if start is not None and stop is not None and not start < stop:
            raise ValueError(f"a segment runs from an earlier point to a later one, got start={start}, stop={stop}.")
        session = _SegmentSession(Capture(self.points), start, value, stop)
        result = None
        with self._session(session):
            try:
                result = forward()
            except StopForward:
                if stop is None:
                    raise
        if start is not None and not session.started:
            raise self._never_reached(start)
        if stop is None:
            return result
        if stop not in session.capture._values:
            raise self._never_reached(stop)
        return session.capture._values[stop]

    def run_to(self, k: int, forward: Callable[[], Any]) -> torch.Tensor:
        """Run ``forward()`` until exit point ``k`` (0-based) has its feature; later modules do not run."""
        self._check_point(k)  # k=None would be stop=None there: the whole pass
        return self.run_segment(forward, stop=k)

    def check_gradients(self, features: Sequence[torch.Tensor]) -> None:
        """Raise when a trainable point's feature carries no gradient in a training pass with autograd on.

        A backbone can compute its blocks outside autograd (RevViT's reversible backprop runs them inside a custom
        ``autograd.Function``): the exits would train on detached features and their losses never reach the
        backbone, silently. Frozen modules (no parameter requires grad) are fine.
        """
        if not torch.is_grad_enabled():
            return
        detached = [
            p.module
            for p, f, m in zip(self.points, features, self._modules())
            if not f.requires_grad and any(q.requires_grad for q in m.parameters())
        ]
        if detached:
            raise ValueError(
                f"the features at exit points {detached} carry no gradient although those modules train: the "
                f"backbone computes them outside autograd (e.g. RevViT's reversible backprop), so the exits' losses "
                f"would never reach it. Train that backbone with plain backprop (e.g. RevViT's "
                f"no_custom_backward=True, which SelfDistillClassifier sets) or name stage_modules whose outputs "
                f"carry gradients."
            )

    @contextlib.contextmanager
    def intercept(self, fn: InterceptFn) -> Iterator[None]:
        """Call ``fn`` at every exit point during the forward pass run inside the block (see :data:`InterceptFn`)."""
        with self._session(_InterceptSession(self, fn)):
            yield

    # copying ------------------------------------------------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

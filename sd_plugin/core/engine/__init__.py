"""The exit engine: where exits go on any backbone, and the taps that read them.

One place owns exit points for both adapters. Placement is a pipeline, one module per step, driven by
:func:`find_exit_layout` (:mod:`._find`):

1. **trace** (:mod:`._probe`): one forward pass (on the meta device where the model allows it, else for real in eval
   mode without gradients) records every module call, the call tree and each call's batch-first outputs;
2. **candidates** (:mod:`._candidates`): the feature layout of each output (NCHW, NHWC, NLC tokens, channels-last
   token groups), a position for each call that hands on a feature, and the main path through them, found from the
   call tree, not from a list of container names;
3. **cut tests** (:mod:`._cuts`): whether a module is on the main path, by handing on a smaller batch (or, on real
   tensors, swapping its output in), cached per probe pass;
4. **choice** (:mod:`._choice`): stages (where the resolution changes) or, for isotropic models, blocks; the
   configured exit indices into them; strides.

The **taps** (:mod:`._taps`, :class:`ExitEngine`) are persistent per-thread hooks that capture features, stop the
forward after exit *k*, or let early exit hand on fewer samples.

Adapters only say which modules are candidates (timm: ``feature_info``; MMPretrain: the whole backbone, or the
user's ``stage_modules``) and how to run the model.
"""

from __future__ import annotations

from ._find import ExitLayout, find_exit_layout
from ._points import FEATURE_FORMATS, ExitPoint, StopForward, get_submodule, select_feature
from ._probe import ProbeError
from ._taps import Capture, ExitEngine, InterceptFn

__all__ = [
    "ExitEngine",
    "ExitLayout",
    "ExitPoint",
    "Capture",
    "InterceptFn",
    "StopForward",
    "FEATURE_FORMATS",
    "ProbeError",
    "find_exit_layout",
    "get_submodule",
    "select_feature",
]

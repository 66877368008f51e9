"""``RNGStateHook``: every random number training draws is a function of the seed and the position in training.

So a crashed run resumed with ``resume=True`` repeats exactly what the uninterrupted
run would have done, with shuffling, random augmentation and data-loader workers.
``sd-plugin train`` adds it by default (``--no-rng-state-hook`` leaves it out).
"""

from __future__ import annotations

import functools
import random
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.runner import EpochBasedTrainLoop

from ..registry import HOOKS

__all__ = ["RNGStateHook", "seed_all", "capture_rng_state", "restore_rng_state"]

CHECKPOINT_KEY = "sd_plugin_rng_state"


def _derive(*keys: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: nearby keys give unrelated streams)."""
    words = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_all(*keys: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU) from ``keys``."""
    seed = _derive(*keys)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> Dict[str, Any]:
    """The state of every global generator of this process (Python, NumPy, torch CPU, CUDA if present)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    keys = np.asarray(keys)
    # plain ints, floats and tensors only: the state loads under torch's weights_only=True
    numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state: Dict[str, Any] = dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Undo everything drawn since :func:`capture_rng_state` returned ``state``."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_worker(worker_id: int, keys: Sequence[int], inner: Optional[Callable[[int], None]]) -> None:
    if inner is not None:
        inner(worker_id)  # mmengine's own worker_init_fn (it also silences warnings in workers > 0)
    seed_all(*keys, worker_id)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Make resumed training bitwise equal to uninterrupted training.

    Epoch-based loops: before every training epoch the main process's generators
    (Python, NumPy, torch CPU/CUDA) are seeded from ``(seed, epoch)`` (mmengine's
    ``runner.seed``, which already differs per rank when ``diff_rank_seed=True``), and
    each data-loader worker from ``(seed, epoch, rank, worker id)``. An epoch's
    dropout, drop-path, shuffling and augmentation then depend on nothing drawn
    before it, so resuming at an epoch boundary is exact, whatever ran in between
    (validation, other hooks) and whatever the worker count. Persistent workers
    keep their generators across epochs, which a resumed run cannot reproduce;
    they are therefore restarted at each epoch (the cost of one worker start-up
    per epoch; logged once).

    Iteration-based loops: the main process's generators are saved in every
    checkpoint and restored before the first iteration after ``resume``
    (mmengine replays the skipped batches first). This is exact when the
    augmentation runs in workers (``num_workers > 0``: mmengine's replay then
    repeats the workers' streams); with ``num_workers=0`` the replay draws the
    augmentation from the main process's generators and the resumed run differs.

    Validation runs with the training generators saved and restored around it,
    so validating (or not) does not change training.

    Args:
        restart_persistent_workers: Restart persistent workers at each epoch (exact
            resume). ``False`` keeps them alive (faster epochs; resume is then exact
            only with ``persistent_workers=False`` or ``num_workers=0``).

    Example:
        >>> custom_hooks = [dict(type='RNGStateHook')]
    """

    priority = "VERY_HIGH"  # seed before the other hooks' before_train_epoch

    def __init__(self, restart_persistent_workers: bool = True) -> None:
        if not isinstance(restart_persistent_workers, bool):
            raise TypeError(
                f"restart_persistent_workers must be True or False, got {type(restart_persistent_workers).__name__}."
            )
        self.restart_persistent_workers = restart_persistent_workers
        self._resumed_state: Optional[Dict[str, Any]] = None
        self._val_state: Optional[Dict[str, Any]] = None
        self._inner_worker_fn: Any = None
        self._said_restart = False

    # -- epoch-based: reseed at every epoch
    def before_train(self, runner: Any) -> None:
        loader = runner.train_dataloader
        self._inner_worker_fn = getattr(loader, "worker_init_fn", None)

    def before_train_epoch(self, runner: Any) -> None:
        if not isinstance(runner.train_loop, EpochBasedTrainLoop):
            return
        seed_all(runner.seed, runner.epoch)
        loader = runner.train_dataloader
        if getattr(loader, "num_workers", 0) > 0:
            loader.worker_init_fn = functools.partial(
                _seed_worker, keys=(runner.seed, runner.epoch, runner.rank), inner=self._inner_worker_fn
            )
            self._restart_persistent_workers(runner, loader)

    def _restart_persistent_workers(self, runner: Any, loader: Any) -> None:
        iterator = getattr(loader, "_iterator", None)
        if iterator is None or not self.restart_persistent_workers:
            return
        if not self._said_restart:
            runner.logger.info(
                "RNGStateHook: restarting the persistent data-loader workers at each epoch, so that each epoch's "
                "augmentation depends only on (seed, epoch, rank, worker) and resume is exact."
            )
            self._said_restart = True
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        loader._iterator = None

    # -- iteration-based: save in the checkpoint, restore after resume
    def before_save_checkpoint(self, runner: Any, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = capture_rng_state()

    def after_load_checkpoint(self, runner: Any, checkpoint: Dict[str, Any]) -> None:
        self._resumed_state = checkpoint.get(CHECKPOINT_KEY)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        state, self._resumed_state = self._resumed_state, None
        if state is not None and runner.iter > 0 and not isinstance(runner.train_loop, EpochBasedTrainLoop):
            restore_rng_state(state)

    # -- validation does not move the training generators
    def before_val(self, runner: Any) -> None:
        self._val_state = capture_rng_state()

    def after_val(self, runner: Any) -> None:
        if self._val_state is not None:
            restore_rng_state(self._val_state)
            self._val_state = None

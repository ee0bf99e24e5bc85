"""Where our model meets Composer's parallel wrappers: the one unwrap helper, and the ``parallelize`` step.

Composer wraps the model it is given in one of two ways. Without an ``fsdp:`` section (and more than one
process) the whole :class:`ComposerLLaDA` becomes ``DistributedDataParallel(ComposerLLaDA)``. With FSDP (FSDP1
in Composer 0.32.1) the ComposerModel stays itself and each of its children is wrapped:
``ComposerLLaDA.model`` becomes ``FullyShardedDataParallel(LLaDAModel)``, and inside it every block chosen by
``fsdp_wrap_fn`` (and, with activation checkpointing, a ``CheckpointWrapper``). ``torch.compile`` adds an
``OptimizedModule`` with the original under ``_orig_mod``.

Callbacks need two different things from this nest, and this module is the only place that knows it:

- :func:`llada_runner` -- the module to *call* (forward, sampling, likelihood): ComposerLLaDA's ``model``
  child as the trainer holds it. Under FSDP that is the FSDP wrapper, which gathers the sharded weights for
  the forward; calling the bare LLaDAModel there would compute with shards.
- :func:`unwrap` / :func:`unwrap_llada` -- the bare modules, for their attributes (``config``, the noise
  clock) and never for a forward under FSDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from composer.core import State, get_precision_context
from composer.utils import dist
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from composer_dlm.config import ConfigError, FSDPConfig
from composer_dlm.models.architectures import AnyModel
from composer_dlm.models.composer_llada import WRAPPER_ATTRS, ComposerLLaDA
from composer_dlm.models.llada import LLaDABlock, LLaDAModel, eager_blocks
from composer_dlm.models.llada_moe import LLaDAMoEBlock, LLaDAMoEModel
from composer_dlm.models.lora import fsdp_units

log = logging.getLogger(__name__)


def _inner(module: nn.Module) -> nn.Module | None:
    """The module one wrapper layer down, or None when ``module`` is not a wrapper we know."""
    if isinstance(module, DistributedDataParallel):
        return module.module
    if isinstance(module, OptimizedModule):
        return module._orig_mod
    # FSDP1 and the activation-checkpoint wrapper keep the wrapped module under these names; looked up by name
    # so that this module needs neither torch.distributed.fsdp nor the checkpoint wrapper importable.
    for name in WRAPPER_ATTRS:
        inner = module._modules.get(name)
        if inner is not None:
            return inner
    return None


def unwrap(module: nn.Module) -> nn.Module:
    """``module`` without its DDP, FSDP1, activation-checkpoint and ``torch.compile`` wrappers, any depth.

    FSDP2 (``fully_shard``) keeps the module's own class, so such a module is returned as it is."""
    while (inner := _inner(module)) is not None:
        module = inner
    return module


def composer_llada(model: nn.Module) -> ComposerLLaDA:
    """The trainer's :class:`ComposerLLaDA` (``state.model``) whatever wraps it; TypeError for another model."""
    inner = unwrap(model)
    if not isinstance(inner, ComposerLLaDA):
        raise TypeError(f"expected the trainer's model to be a ComposerLLaDA, got {type(inner).__name__}")
    return inner


def llada_runner(model: nn.Module) -> nn.Module:
    """The LLaDA trunk to call inside ``state.model``: the bare LLaDAModel under DDP or on one process, its
    FSDP wrapper under FSDP (see the module docstring). Takes the same arguments as ``LLaDAModel.forward``."""
    return composer_llada(model).get_submodule("model")


def unwrap_llada(model: nn.Module) -> AnyModel:
    """The bare :class:`LLaDAModel` (or LLaDA-MoE) inside ``state.model`` (for its ``config``; not for a forward
    under FSDP)."""
    inner = unwrap(llada_runner(model))
    assert isinstance(inner, (LLaDAModel, LLaDAMoEModel)), type(inner)
    return inner


@contextlib.contextmanager
def inference(state: State) -> Iterator[nn.Module]:
    """For callbacks that run the model mid-training (samples, likelihood eval): yields :func:`llada_runner`
    in eval mode, under no_grad, the run's precision and eager blocks (see ``eager_blocks``); restores the
    mode after. Under FSDP every rank must enter it and run the same forwards, since each one is collective."""
    was_training = state.model.training
    state.model.eval()
    try:
        with torch.no_grad(), get_precision_context(state.precision), eager_blocks():
            yield llada_runner(state.model)
    finally:
        state.model.train(was_training)


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, (LLaDABlock, LLaDAMoEBlock))


def _shards(fsdp: FSDPConfig, world_size: int) -> bool:
    """Whether FSDP actually shards parameters: torch runs every strategy as NO_SHARD on one process, and
    HYBRID_SHARD over shard groups of one process is NO_SHARD too."""
    if fsdp.sharding_strategy == "NO_SHARD" or world_size == 1:
        return False
    if fsdp.sharding_strategy != "HYBRID_SHARD":
        return True
    shard = fsdp.data_parallel_shard_degree
    return (shard if shard != -1 else world_size // (fsdp.data_parallel_replicate_degree or 1)) > 1


def parallelize(model: ComposerLLaDA, fsdp: FSDPConfig | None, *, on_gpu: bool) -> dict[str, Any] | None:
    """The builder step that makes the parallel choices for ``model``; returns Composer's ``parallelism_config``.

    With an ``fsdp:`` section, FSDP shards each transformer block as one unit (the embedding, final norm and
    output projection go to the root unit), and ``fsdp.activation_checkpointing`` recomputes each block's
    activations in the backward. Composer reads both choices off the child it wraps (``fsdp_wrap_fn`` and
    ``activation_checkpointing_fn`` on the LLaDAModel), so they are set there, here and nowhere else. A LoRA run's
    fp32 adapters get units of their own, and LoRA on LLaDA-MoE's routed experts leaves those experts out of FSDP,
    whole on every rank (:func:`.models.lora.fsdp_units` says why).

    Without it (or on CPU, where Composer 0.32.1's FSDP cannot run: it places every unit on the current CUDA
    device) Composer uses DDP when there is more than one process, and this returns None.
    """
    if fsdp is None:
        return None
    if not on_gpu:
        log.warning(
            "fsdp: Composer's FSDP needs CUDA devices; on CPU the run uses DDP (no sharding, the same results)"
        )
        return None
    trunk = model.model
    adapter_units, left_out = fsdp_units(trunk)  # LoRA runs: the fp32 adapters in units of their own
    adapters = {id(m) for m in adapter_units}
    if adapters and not _shards(fsdp, dist.get_world_size()):
        # A unit with only frozen parameters has no post-backward hook; unsharded, nothing else turns its
        # parameters back from the forward's tensor views, and state dicts then miss them (torch's FSDP1).
        raise ConfigError(
            "fsdp with model.lora must shard the model over 2 or more processes: unsharded (NO_SHARD, or any "
            "strategy on one process) torch's FSDP loses the frozen base weights from checkpoints after the "
            "first step. On one GPU remove the fsdp section (LoRA needs no sharding there); otherwise use "
            "FULL_SHARD or SHARD_GRAD_OP"
        )
    trunk.fsdp_wrap_fn = lambda module: _is_block(module) or id(module) in adapters
    trunk.activation_checkpointing_fn = _is_block
    config = dataclasses.asdict(fsdp)
    if left_out:  # LoRA on LLaDA-MoE's routed experts: their frozen stacked weights stay whole on every rank
        config["ignored_modules"] = left_out
        # FSDP moves only what it manages onto the rank's GPU; these go there here
        if torch.cuda.is_available():
            for module in left_out:
                module.to(torch.device("cuda", dist.get_local_rank()))
    if adapters:  # the frozen embedding's output needs no grad: reentrant checkpoints would drop the graph
        config["activation_checkpointing_reentrant"] = False
    return {"fsdp": config}

"""Sharded data parallelism for the training loop: PyTorch's FSDP2 (``fully_shard``), ZeRO-3 style.

Under DDP every process holds the whole model, its gradients and its AdamW state (16 bytes per parameter in fp32),
so the largest model one GPU can train bounds every run. ``distributed=fsdp`` splits each parameter, gradient and
optimizer moment over the N processes (each keeps 1/N); a decoder block's weights are gathered just before its
forward and backward and freed after. The sharding units are the entries of the model's outermost ``nn.ModuleList``s
(RETRO's decoder blocks and encoder layers, a pretrained model's layers); embeddings, final norm and head (tied to
the embeddings) form the root unit.

Checkpoints stay the single-process format (``model.safetensors`` with the model's own names, an ``optimizer.pt``
in ``torch.optim``'s layout): the full tensors are gathered to rank 0 and written by it, so eval, generate and a
resume on another number of processes read them as any other run's. On resume rank 0 alone reads them and sends
every process its shards, so a node holds one copy of the model in host memory, not one per process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units of their own: each entry of every ``nn.ModuleList`` not inside another unit."""
    units: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(p) for p in taken):
            continue
        for i, entry in enumerate(module):
            units.append(entry)
            taken.append(f"{name}.{i}.")
    return units


def shard(model: nn.Module, reshard_after_forward: bool = True) -> int:
    """Shard ``model`` in place over the default process group (its parameters become DTensors); returns the number
    of units below the root. Build the optimizer afterwards, over the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    units = shard_units(model)
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return len(units)


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds of ``tensors`` (its shard of a DTensor, all of a plain tensor)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a float (``clip_grad_norm_`` over sharded gradients returns a DTensor)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (every rank must call this): what rank 0 alone read decides for all, so that
    no rank enters a collective that the others skip."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_model_state(model: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The full tensors of the state-dict names ``keep`` accepts, on rank 0's CPU (empty elsewhere). Every rank must
    call this; the tensors are gathered one at a time, so no rank holds the whole model."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    main = dist.get_rank() == 0
    out = {}
    for name, t in model.state_dict().items():
        if not keep(name):
            continue
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            out[name] = full.detach().cpu()
    return out


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor] | None) -> None:
    """Load full tensors into the sharded ``model``: rank 0 passes them (every name the model holds that they
    cover), the other ranks None and receive their shards from it. Every rank must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, dict(state or {}), options=options)


def _optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer steps, in the order ``opt.state_dict()`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state in ``torch.optim``'s own layout (parameters numbered, as ``opt.state_dict()``
    of one process), on rank 0 (empty elsewhere). Every rank must call this."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not opt.state:  # before the first step: torch's getter would take a zero step to make up a state to return
        return opt.state_dict() if dist.get_rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0's CPU only
    by_name = get_optimizer_state_dict(model, opt, options=options)
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(_optimizer_names(model, opt))}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def optimizer_state_error(model: nn.Module, opt: torch.optim.Optimizer, state: object) -> str | None:
    """Why ``state`` (read from an optimizer.pt) does not fit ``opt`` of ``model``, or None when it does."""
    names = _optimizer_names(model, opt)
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        return "not an optimizer state (state and param_groups)"
    groups = state["param_groups"]
    numbered = [i for g in groups for i in g.get("params", [])]
    if sorted(numbered) != list(range(len(names))) or len(groups) != len(opt.param_groups):
        return (f"optimizer state of {len(numbered)} parameters in {len(groups)} groups, but this run trains "
                f"{len(names)} in {len(opt.param_groups)}")
    if not set(state["state"]) <= set(range(len(names))):
        return "optimizer state of parameters this run does not train"
    return None


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict | None) -> None:
    """Load a state in ``torch.optim``'s layout (as :func:`full_optimizer_state` writes it, checked by
    :func:`optimizer_state_error`) into the optimizer of the sharded ``model``: rank 0 passes it, the other ranks
    None. Every rank must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_names(model, opt)
    by_name = empty = None
    if state is not None:
        if state["state"]:
            by_name = {"state": {names[i]: s for i, s in state["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                        for g in state["param_groups"]]}
        else:
            empty = state
    # an empty state (a checkpoint before the first step) is its groups' settings alone: loaded as they are, since
    # torch's setter would first take a zero step and leave every parameter a state one step old
    if (empty := from_main(empty)) is not None:
        opt.load_state_dict(empty)
        return
    set_optimizer_state_dict(model, opt, by_name or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

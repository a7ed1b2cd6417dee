"""NamedOptimizer: a ``torch.optim`` optimizer whose state dict is keyed by parameter names.

A plain optimizer's ``state_dict()`` numbers parameters by their position in
its param groups; this one uses fully qualified names (``"net1.0.weight"``),
so a state dict survives changes of group structure and loads state for the
parameters it names only (conditional training: parameters that never got a
gradient have no state). ShardedTensor parameters need nothing special: their
optimizer state is ShardedTensors of the same layout, and loading copies into
that state whatever layout the saved tensors have (a dense tensor is sliced).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, overload

import torch
import torch.nn as nn

__all__ = ["NamedOptimizer"]


class NamedOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer of ``optimizer_class`` and exposes its state by parameter name.

    Args:
        named_parameters: name -> parameter (``model.named_parameters()`` or a dict).
        optimizer_class: the optimizer to build, e.g. ``torch.optim.SGD``.
        param_groups: if given, the optimizer is built from these groups (each
            a dict with ``"params"``, which must all be named parameters) instead
            of every named parameter.
        module: the module the parameters belong to (kept for callers; unused).
        args: passed to ``optimizer_class`` (positionally, after the parameters).
        kwargs: passed to ``optimizer_class``.

    ``param_groups`` and ``state`` are the wrapped optimizer's; ``step``,
    ``zero_grad`` and ``add_param_group`` go to it too.

    Raises:
        AssertionError: a param group that is not a dict or has no ``"params"``
            (the legacy messages).
        TypeError: a param group entry that is not a tensor.
        ValueError: a parameter in ``param_groups`` that is not a named parameter.
    """

    def __init__(
        self,
        named_parameters: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        optimizer_class: Callable[..., torch.optim.Optimizer],
        param_groups: Collection[Mapping[str, Any]] | None = None,
        module: nn.Module | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Optimizer.__init__ is not called: this object delegates to the wrapped one.
        self.named_parameters: dict[str, torch.Tensor] = dict(named_parameters)
        self.module = module
        if param_groups is not None:
            groups = [_checked_group(group) for group in param_groups]
            names = self._names()
            keys = []
            for group in groups:
                for param in group["params"]:
                    if id(param) not in names:
                        raise ValueError(
                            f"Expect param name for a parameter of size {tuple(param.shape)} "
                            "found in param group but is missing."
                        )
                    keys.append(names[id(param)])
            self._optimizer = optimizer_class(groups, *args, **kwargs)
            self.ordered_param_keys: list[str] = keys
        else:
            self._optimizer = optimizer_class(
                list(self.named_parameters.values()), *args, **kwargs
            )
            self.ordered_param_keys = list(self.named_parameters)
        self.param_groups = self._optimizer.param_groups

    def _names(self) -> dict[int, str]:
        return {id(param): name for name, param in self.named_parameters.items()}

    # -- delegation ----------------------------------------------------------------
    # Optimizer declares these as plain attributes; here they are the wrapped optimizer's.
    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._optimizer.state

    @property
    def defaults(self) -> Any:  # type: ignore[override]
        return self._optimizer.defaults

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the wrapped optimizer."""
        return self._optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none)

    def __repr__(self) -> str:
        return f"NamedOptimizer({self._optimizer!r})"

    # -- state dicts -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict with parameter names for positions.

        ``"state"`` maps a name to that parameter's state (ShardedTensors for
        ShardedTensor parameters); each of ``"param_groups"`` lists the sorted
        names of its parameters under ``"params"``.
        """
        inner = self._optimizer.state_dict()
        state = {self.ordered_param_keys[index]: value
                 for index, value in inner["state"].items()}
        groups = []
        for group in inner["param_groups"]:
            named: dict[str, Any] = {
                "params": sorted(self.ordered_param_keys[i] for i in group["params"])
            }
            named.update({k: copy.deepcopy(v) for k, v in group.items() if k != "params"})
            groups.append(named)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` in place: tensors are copied into the existing state.

        The optimizer's state must exist (after a step, or :meth:`init_state`),
        so the loaded state can be checked against it. Parameters absent from
        ``state_dict`` (conditional training) keep their state, and groups are
        matched by their set of parameter names; groups not found keep their
        hyperparameters. A ShardedTensor state is filled from a saved tensor of
        any layout, or from a dense one (each rank keeps its blocks).

        Raises:
            ValueError: no state yet (``"Expects the optim to be initialized
                before load but found not initialized."``), or a parameter's
                or group's entries differ from the current ones.
        """
        current = self._optimizer.state_dict()
        new_state = current["state"]
        if len(new_state) == 0:
            raise ValueError(
                "Expects the optim to be initialized before load but found not initialized."
            )
        saved_state = state_dict["state"]
        for index, key in enumerate(self.ordered_param_keys):
            if key not in saved_state or index not in new_state:
                continue  # conditional training: no state for this parameter
            saved, target = saved_state[key], new_state[index]
            if len(saved) != len(target):
                raise ValueError(
                    f"Expects equal length as {len(target)} for parameter {key} but found: "
                    f"{len(saved)}"
                )
            for name, value in target.items():
                if name not in saved:
                    raise ValueError(
                        f"Expects state {name} for parameter {key} but not found."
                    )
                source = saved[name]
                if isinstance(value, torch.Tensor):
                    if not isinstance(source, torch.Tensor):
                        raise ValueError(
                            f"Expects a tensor for state {name} of parameter {key} but found "
                            f"{type(source).__name__}."
                        )
                    with torch.no_grad():
                        value.detach().copy_(source)
                else:
                    target[name] = copy.deepcopy(source)

        saved_groups = {_group_key(g["params"]): g for g in state_dict["param_groups"]}
        for group in current["param_groups"]:
            key = _group_key([self.ordered_param_keys[i] for i in group["params"]])
            if key not in saved_groups:
                continue  # not all parameters were trained: no such group saved
            saved_group = saved_groups[key]
            if len(saved_group) != len(group):
                raise ValueError(
                    f"Expects equal param_group size as {len(group)} for group {key} but "
                    f"found {len(saved_group)}."
                )
            for name in saved_group:
                if name not in group:
                    raise ValueError(
                        f"Expects group key {name} to be in group {key} in `state_dict` but "
                        "is missing."
                    )
                if name != "params":
                    group[name] = copy.deepcopy(saved_group[name])
        self._optimizer.load_state_dict(current)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of named parameters to the wrapped optimizer.

        Raises:
            ValueError: a parameter that is not one of the named parameters
                (``"some parameters are not in the module"``).
        """
        group = _checked_group(param_group)
        names = self._names()
        if any(id(param) not in names for param in group["params"]):
            raise ValueError("some parameters are not in the module")
        self._optimizer.add_param_group(group)
        self.ordered_param_keys.extend(names[id(param)] for param in group["params"])
        self.param_groups = self._optimizer.param_groups

    def init_state(self) -> None:
        """Create the optimizer state now: zero gradients for every parameter, then one step.

        Optimizers create their state lazily, at the first step; loading a
        state dict in place needs it to exist. Like any step, hyperparameters
        such as weight decay may still move the parameters.
        """
        for param in self.named_parameters.values():
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
        self.step()


def _checked_group(group: Any) -> dict[str, Any]:
    """A param group with ``"params"`` as a list of tensors (legacy checks and messages)."""
    if not isinstance(group, dict):
        raise AssertionError("param group must be a dict")
    if "params" not in group:
        raise AssertionError("param group must contain key params")
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(
                "optimizer can only optimize Tensors, but one of the params is "
                + torch.typename(param)
            )
    group["params"] = params
    return group


def _group_key(names: Iterable[str]) -> str:
    """One param group's identity: its sorted parameter names."""
    return "/".join(sorted(names))

"""CUDA code paths on the CPU build: tensors on `cuda:0` that are only metadata (torch's FakeTensorMode),
under a strict device check.

FakeTensorMode alone lets a CPU 0-dim tensor mix with CUDA ones in any op, where real CUDA refuses it
in torch.stack/cat ("Expected all tensors to be on the same device"). `DeviceCheck` refuses every op
that mixes devices (copies excepted), and records what a GPU run would pay for:
* `syncs`: reads of a device value on the host (.item(), .tolist()), each a wait for the GPU (float(t)
  raises instead: it takes a CUDA device guard);
  they return 0 here, so code that reads values at a log window can run to the end;
* `uploads`: tensors copied from the CPU to the GPU (the shapes).
Data-dependent shapes (boolean masks, nonzero) raise, as they force a sync too.

Limits of the method: no autograd (the CPU build has no CUDA device guard for the graph's metadata), so
forward passes only, under no_grad; and Python's tensor indexing takes a CUDA device guard in C++, so
`t[...]` is routed through the equivalent aten view ops while the mode is on.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)
_COPIES = {aten._to_copy.default, aten.copy_.default, aten.to.dtype_layout, aten.to.device, aten.to.dtype,
           aten.to.other, aten.lift_fresh.default, aten.lift_fresh_copy.default}


class DeviceCheck(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.uploads: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func is aten._local_scalar_dense.default:
            self.syncs.append(str(func))
            return 0.0 if tensors[0].is_floating_point() else 0
        out = func(*args, **kwargs)
        if func in _COPIES:
            if tensors and tensors[0].device.type == "cpu" and isinstance(out, torch.Tensor) and out.device.type == "cuda":
                self.uploads.append(tuple(tensors[0].shape))
            return out
        devices = {t.device.type for t in tensors}
        if len(devices) > 1:
            raise RuntimeError(f"{func} mixes devices {sorted(devices)}: on a GPU this raises 'Expected all tensors "
                               "to be on the same device'")
        return out


def _getitem(self: torch.Tensor, index):
    """Basic indexing (ints, slices, None, Ellipsis) through aten view ops."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) or isinstance(i, (list, bool)) for i in index):
        return _ORIGINAL_GETITEM(self, index)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        rest = len([i for i in index if i is not None and i is not Ellipsis])
        index = index[:at] + (slice(None),) * (self.dim() - rest) + index[at + 1:]
    out, dim = self, 0
    for i in index:
        if i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        else:
            start, stop, step = i.indices(out.shape[dim])
            out, dim = aten.slice.Tensor(out, dim, start, max(start, stop), step), dim + 1
    return out


_ORIGINAL_GETITEM = torch.Tensor.__getitem__


@contextlib.contextmanager
def fake_cuda():
    """Inside: torch.* factories take device=CUDA (or "cuda:0"; a bare "cuda" asks the driver for its current
    device, which the CPU build cannot), and `to_fake_cuda(module, check)` moves a module there. Yields the check."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode, DeviceCheck() as check, torch.no_grad():
        check.mode = mode
        torch.Tensor.__getitem__ = _getitem
        try:
            yield check
        finally:
            torch.Tensor.__getitem__ = _ORIGINAL_GETITEM


def to_fake_cuda(module: torch.nn.Module, check: DeviceCheck) -> torch.nn.Module:
    """The module's parameters and buffers as fake CUDA tensors (frozen: no autograd here)."""
    module.requires_grad_(False)
    return module._apply(lambda t: check.mode.from_tensor(t).to(CUDA))


def as_fake(check: DeviceCheck, tensor: torch.Tensor, device=CUDA) -> torch.Tensor:
    """A real tensor made before the mode as a fake one on `device`."""
    return check.mode.from_tensor(tensor).to(device)

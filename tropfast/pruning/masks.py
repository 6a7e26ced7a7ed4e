"""Masks that keep pruned weights exactly zero while the model is fine-tuned.

A masked Linear keeps a plain ``weight`` Parameter (so state dicts, ``save_adapter`` and
optimizers see the usual names) plus a non-persistent bool buffer ``tropfast_mask``:

* a gradient hook zeroes the gradient of every pruned entry, and
* a global optimizer step post-hook re-zeroes every pruned entry after *any*
  ``torch.optim`` optimizer step, so weight decay, momentum left over from before pruning
  or any other optimizer state cannot move a pruned weight away from zero.

``remove_masks`` detaches everything; ``apply_masks`` re-zeroes by hand (for weights
written outside an optimizer step, e.g. ``load_state_dict``).
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

__all__ = ["attach_mask", "apply_masks", "remove_masks", "masked_modules", "keep_only", "MASK_BUFFER"]

MASK_BUFFER = "tropfast_mask"
# module -> [weight the gradient hook sits on, its handle, the forward pre-hook's handle].
# Kept outside the modules so that deepcopy never duplicates a handle.
_STATE: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_STEP_HOOK = None


# float dtype -> the integer dtype of its width (keep_only multiplies the bits by the mask)
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def keep_only(w: Tensor, mask: Tensor) -> Tensor:
    """A new tensor: ``w`` where ``mask`` is True, +0 elsewhere (``w.masked_fill(~mask, 0)`` bit for bit).

    On the CPU a float tensor goes through its bits, as integers times the mask (a kept entry's
    bits times 1, a pruned one's times 0: +0), which costs a tenth of ``masked_fill``'s branchy
    kernel there; elsewhere it is ``masked_fill``.
    """
    mask = mask.to(w.device, torch.bool)
    bits = _BITS.get(w.dtype)
    if bits is None or w.device.type != "cpu":
        return w.masked_fill(~mask, 0)
    return torch.mul(w.view(bits), mask).view(w.dtype)


def _after_step(optimizer, args, kwargs) -> None:
    _reapply(list(_STATE.keys()))


def _reapply(modules) -> None:
    with torch.no_grad():
        for m in modules:
            mask = m._buffers.get(MASK_BUFFER)
            w = getattr(m, "weight", None)
            if mask is None or w is None or w.shape != mask.shape:
                continue
            w.masked_fill_(~mask.to(w.device), 0)


def _ensure_step_hook() -> None:
    global _STEP_HOOK
    if _STEP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK = register_optimizer_step_post_hook(_after_step)


def _grad_hook_for(module: nn.Module):
    ref = weakref.ref(module)

    def hook(grad: Tensor) -> Tensor:
        m = ref()
        mask = None if m is None else m._buffers.get(MASK_BUFFER)
        if mask is None or mask.shape != grad.shape:
            return grad
        return grad.masked_fill(~mask.to(grad.device), 0)

    return hook


def _ensure_grad_hook(module: nn.Module, *_args) -> None:
    """Put the gradient hook on the current weight (frozen weights get it once unfrozen)."""
    st = _STATE.get(module)
    if st is None:
        return
    w = module.weight
    if st[0] is w or not w.requires_grad:
        return
    if st[1] is not None:
        st[1].remove()
    st[0], st[1] = w, w.register_hook(_grad_hook_for(module))


def attach_mask(module: nn.Module, mask: Tensor) -> None:
    """Keep ``module.weight`` zero wherever ``mask`` is False.  mask: weight's shape, bool."""
    _attach(module, mask)


def _attach(module: nn.Module, mask: Tensor, *, zero: bool = True, copy: bool = True) -> None:
    """attach_mask; ``prune`` passes a fresh mask (copy=False) of weights it has zeroed (zero=False)."""
    w = module.weight
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    _detach(module)
    module.register_buffer(MASK_BUFFER, mask.clone() if copy else mask, persistent=False)
    _STATE[module] = [None, None, module.register_forward_pre_hook(_ensure_grad_hook)]
    _ensure_grad_hook(module)
    if zero:
        _reapply([module])
    _ensure_step_hook()


def _detach(module: nn.Module) -> bool:
    st = _STATE.pop(module, None)
    if st is not None:
        for h in st[1:]:
            if h is not None:
                h.remove()
    had = MASK_BUFFER in module._buffers
    if had:
        del module._buffers[MASK_BUFFER]
    return had


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module of ``model`` carrying a tropfast mask."""
    return [(n, m) for n, m in model.named_modules() if MASK_BUFFER in m._buffers]


def apply_masks(model: nn.Module) -> int:
    """Zero every masked weight of ``model`` now; returns how many modules carry a mask."""
    mods = [m for _, m in masked_modules(model)]
    _reapply(mods)
    return len(mods)


def remove_masks(model: nn.Module) -> int:
    """Detach every tropfast mask from ``model`` (the weights keep their current values)."""
    n = 0
    for _, m in masked_modules(model):
        n += _detach(m)
    return n

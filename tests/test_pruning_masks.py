"""Masks on plain Linear layers: apply_masks, the optimizer step hook and the gradient hook,
including the unusual states a user can leave a masked module in."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.optim import optimizer as optimizer_module

from tropfast.pruning import masks as masks_mod
from tropfast.pruning.masks import MASK_BUFFER, apply_masks, attach_mask, masked_modules, remove_masks

MASK = torch.tensor([[True, False, True], [False, True, False]])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 2))


def test_apply_masks_zeroes_what_was_written_outside_a_step():
    net = _net()
    for lin in net:
        attach_mask(lin, MASK)
    with torch.no_grad():
        for lin in net:
            lin.weight.fill_(1.0)  # as a load_state_dict would
    assert apply_masks(net) == 2
    for lin in net:
        assert lin.weight.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert apply_masks(nn.Linear(2, 2)) == 0


def test_apply_masks_skips_a_replaced_or_removed_weight_and_goes_on():
    net = _net()
    for lin in net:
        attach_mask(lin, MASK)
    net[0].weight = nn.Parameter(torch.ones(4, 3))  # another shape: the mask no longer applies
    with torch.no_grad():
        net[1].weight.fill_(1.0)
    assert apply_masks(net) == 2
    assert net[0].weight.tolist() == [[1.0] * 3] * 4  # left alone
    assert net[1].weight.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]  # the next module still masked
    del net[0].weight  # no weight at all
    with torch.no_grad():
        net[1].weight.fill_(2.0)
    assert apply_masks(net) == 2 and net[1].weight.tolist() == [[2.0, 0.0, 2.0], [0.0, 2.0, 0.0]]


def test_every_optimizer_step_rezeroes_and_survives_a_lost_buffer():
    # the global step hook is registered by the first attach: start without one (an earlier
    # test in this process may have registered it)
    if masks_mod._STEP_HOOK is not None:
        masks_mod._STEP_HOOK.remove()
        masks_mod._STEP_HOOK = None
    net = _net()
    for lin in net:
        attach_mask(lin, MASK)
    # one hook for all masks, however many are attached
    hooks = optimizer_module._global_optimizer_post_hooks.values()
    assert sum(h is masks_mod._after_step for h in hooks) == 1
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with torch.no_grad():
        net[1].weight.fill_(1.0)
    opt.step()  # no gradients: the step moves nothing, the hook re-zeroes
    assert net[1].weight.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    del net[0]._buffers[MASK_BUFFER]  # a module that lost its mask buffer is skipped
    x = torch.ones(1, 3)
    (net[0](x).sum() + net[1](x).sum()).backward()
    assert net[0].weight.grad.tolist() == [[1.0] * 3] * 2  # its gradient is left whole
    assert net[1].weight.grad.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    with torch.no_grad():
        net[1].weight.fill_(3.0)
    opt.step()
    assert net[1].weight.tolist() == [[2.5, 0.0, 2.5], [0.0, 2.5, 0.0]]
    remove_masks(net)


def test_gradient_hook_outlives_its_module():
    lin = nn.Linear(3, 2)
    attach_mask(lin, MASK)
    lin(torch.ones(1, 3))  # the forward pre-hook puts the gradient hook on the weight
    w = lin.weight
    del lin
    gc.collect()
    (w * torch.ones(2, 3)).sum().backward()  # the module is gone: the gradient passes unchanged
    assert w.grad.tolist() == [[1.0] * 3] * 2


def test_attach_checks_the_shape_and_remove_detaches():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"mask shape \(3, 2\) does not match weight \(2, 3\)"):
        attach_mask(lin, MASK.t())
    attach_mask(lin, MASK.to(torch.uint8))  # any 0/1 dtype, stored as bool
    assert lin._buffers[MASK_BUFFER].dtype == torch.bool and [n for n, _ in masked_modules(lin)] == [""]
    assert remove_masks(lin) == 1 and MASK_BUFFER not in lin._buffers and lin not in masks_mod._STATE


def test_attach_zeroes_at_once_and_keeps_its_own_copy_of_the_mask():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    mask = MASK.clone()
    attach_mask(lin, mask)
    assert lin.weight.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    mask.fill_(True)  # the caller's tensor changes later: the module's mask does not
    assert torch.equal(lin._buffers[MASK_BUFFER], MASK)
    remove_masks(lin)
    assert not lin._forward_pre_hooks and not lin.weight._backward_hooks  # nothing left behind


def test_a_replaced_weight_gets_the_gradient_hook_each_time():
    lin = nn.Linear(3, 2)
    attach_mask(lin, MASK)
    x = torch.ones(1, 3)
    for _ in range(3):  # e.g. reloaded or re-wrapped weights
        lin.weight = nn.Parameter(torch.ones(2, 3))
        lin(x).sum().backward()
        assert lin.weight.grad.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    remove_masks(lin)


_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_keep_only_is_masked_fill_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 9, generator=g).to(dtype)
    w[0, :4] = -0.0  # a kept -0 stays -0; a pruned entry becomes +0, as masked_fill gives
    w[1, 0], w[1, 1] = float("inf"), float("-inf")
    m = torch.rand(6, 9, generator=g) > 0.5
    m[0, :2] = True
    m[0, 2:4] = False
    m[1, :2] = True
    it = _INT[w.element_size()]
    for ww, mm in ((w, m), (w.t(), m.t()), (w[:, ::2], m[:, ::2])):  # strided views too
        got = masks_mod.keep_only(ww, mm)
        want = ww.masked_fill(~mm, 0)
        assert got.dtype == dtype and got.shape == ww.shape
        assert torch.equal(got.contiguous().view(it), want.contiguous().view(it))
    before = w.clone()
    masks_mod.keep_only(w, m)
    assert torch.equal(w.view(it), before.view(it))  # the input is left as it was


def test_keep_only_takes_a_0_1_mask_and_other_dtypes():
    w = torch.tensor([[1.5, -2.0, 3.0]])
    u8 = torch.tensor([[2, 0, 1]], dtype=torch.uint8)  # nonzero = kept, as a bool mask (not factors)
    assert masks_mod.keep_only(w, u8).tolist() == [[1.5, 0.0, 3.0]]
    ints = torch.tensor([[5, -6, 7]])
    assert masks_mod.keep_only(ints, u8.bool()).tolist() == [[5, 0, 7]]
    c = torch.tensor([1 + 2j, 3 - 1j])
    assert masks_mod.keep_only(c, torch.tensor([False, True])).tolist() == [0j, 3 - 1j]

"""Tests of lightning_ema.functional, checked against plain Python arithmetic in float64 and explicit values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ema.functional import (
    WRAPPER_PREFIXES,
    canonical_name,
    copy_,
    ema_dtype_for,
    exchange_,
    finite_each,
    gated_copy_,
    gated_lerp_,
    is_selected,
    lerp_,
    nonfinite_mask,
    screen_into_,
)

NAN = float("nan")
INF = float("inf")


def _random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _reference_lerp(ema: torch.Tensor, weight: torch.Tensor, w: float) -> list[float]:
    """``ema + w * (x - ema)`` element by element with Python floats (float64)."""
    return [
        e + w * (x - e)
        for e, x in zip(ema.double().flatten().tolist(), weight.double().flatten().tolist(), strict=True)
    ]


def _max_abs_error(actual: torch.Tensor, expected: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(actual.double().flatten().tolist(), expected, strict=True))


# ----------------------------------------------------------------------------------------------- names


def test_wrapper_prefixes_are_the_three_wrappers() -> None:
    assert set(WRAPPER_PREFIXES) == {"module.", "_orig_mod.", "_forward_module."}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fc.weight", "fc.weight"),
        ("module.fc.weight", "fc.weight"),
        ("module.net._orig_mod.fc.weight", "net.fc.weight"),
        # `module.` is a wrapper only where it leads the name: a submodule called `module` stays.
        ("encoder.module.weight", "encoder.module.weight"),
        ("encoder.module.module.weight", "encoder.module.module.weight"),
        # `_orig_mod.` and `_forward_module.` are removed wherever they occur.
        ("_orig_mod.fc.weight", "fc.weight"),
        ("net._orig_mod.fc.weight", "net.fc.weight"),
        ("a._orig_mod.b._orig_mod.c.bias", "a.b.c.bias"),
        ("_forward_module.fc.weight", "fc.weight"),
        ("net._forward_module.fc.weight", "net.fc.weight"),
        ("module._forward_module.net._orig_mod.fc.weight", "net.fc.weight"),
        # Only whole path components are wrappers.
        ("net._orig_mod_x.weight", "net._orig_mod_x.weight"),
        ("net.x_orig_mod.weight", "net.x_orig_mod.weight"),
        ("modules.fc.weight", "modules.fc.weight"),
        ("my_module.fc.weight", "my_module.fc.weight"),
        ("net._forward_modules.weight", "net._forward_modules.weight"),
    ],
)
def test_canonical_name(name: str, expected: str) -> None:
    assert canonical_name(name) == expected


def test_canonical_name_is_idempotent() -> None:
    for name in ("module.net._orig_mod.fc.weight", "encoder.module.weight", "_forward_module.a.b"):
        once = canonical_name(name)
        assert canonical_name(once) == once


@pytest.mark.parametrize(
    ("name", "include", "exclude", "expected"),
    [
        ("fc.weight", None, None, True),
        ("generator.fc.weight", ["generator.*"], None, True),
        ("discriminator.fc.weight", ["generator.*"], None, False),
        ("generator.fc.weight", None, ["*.fc.*"], False),
        ("generator.conv.weight", None, ["*.fc.*"], True),
        # exclude wins over include
        ("generator.fc.weight", ["generator.*"], ["*.weight"], False),
        ("generator.fc.bias", ["generator.*"], ["*.weight"], True),
        # any of several patterns
        ("b.weight", ["a.*", "b.*"], None, True),
        ("c.weight", ["a.*", "b.*"], None, False),
        ("c.weight", None, ["a.*", "c.*"], False),
        # `*` crosses dots, `?` is one character, [..] a character class
        ("generator.block.0.fc.weight", ["generator.*.weight"], None, True),
        ("layer1.weight", ["layer?.weight"], None, True),
        ("layer10.weight", ["layer?.weight"], None, False),
        ("layer2.weight", ["layer[12].weight"], None, True),
        ("layer3.weight", ["layer[12].weight"], None, False),
        # patterns are whole-name and case-sensitive
        ("generator.fc.weight", ["generator"], None, False),
        ("Generator.fc.weight", ["generator.*"], None, False),
        ("fc.weight", ["fc.weight"], None, True),
    ],
)
def test_is_selected(name: str, include: list[str] | None, exclude: list[str] | None, expected: bool) -> None:
    assert is_selected(name, include, exclude) is expected


def test_is_selected_accepts_tuples() -> None:
    assert is_selected("a.b", ("a.*",), ("x.*",)) is True
    assert is_selected("x.b", None, ("x.*",)) is False


# ----------------------------------------------------------------------------------------------- dtype


@pytest.mark.parametrize(
    ("weight_dtype", "requested", "expected"),
    [
        (torch.float16, None, torch.float32),
        (torch.bfloat16, None, torch.float32),
        (torch.float32, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.bfloat16, torch.float64, torch.float64),
        (torch.float32, torch.float64, torch.float64),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float16, torch.float16),
        (torch.float16, torch.float16, torch.float16),
    ],
)
def test_ema_dtype_for(weight_dtype: torch.dtype, requested: torch.dtype | None, expected: torch.dtype) -> None:
    assert ema_dtype_for(weight_dtype, requested) == expected


# ----------------------------------------------------------------------------------------------- lerp_


@pytest.mark.parametrize("w", [0.0, 1e-4, 0.1, 0.5, 0.75, 1.0])
def test_lerp_same_dtype_float64_matches_python_floats(w: float) -> None:
    shapes = [(3, 4), (5,), (2, 1, 3)]
    ema = [_random(shape, seed=i, dtype=torch.float64) for i, shape in enumerate(shapes)]
    weights = [_random(shape, seed=10 + i, dtype=torch.float64) for i, shape in enumerate(shapes)]
    expected = [_reference_lerp(e, x, w) for e, x in zip(ema, weights, strict=True)]
    weights_before = [x.clone() for x in weights]
    ema_objects = [id(e) for e in ema]
    lerp_(ema, weights, w)
    for actual, reference in zip(ema, expected, strict=True):
        assert _max_abs_error(actual, reference) <= 1e-15 * 8
    for x, before in zip(weights, weights_before, strict=True):
        assert torch.equal(x, before)
    assert [id(e) for e in ema] == ema_objects  # in place


@pytest.mark.parametrize("w", [1e-4, 0.1, 0.5, 0.9])
def test_lerp_same_dtype_float32(w: float) -> None:
    ema = [_random((7, 3), seed=1), _random((4,), seed=2)]
    weights = [_random((7, 3), seed=3), _random((4,), seed=4)]
    expected = [_reference_lerp(e, x, w) for e, x in zip(ema, weights, strict=True)]
    lerp_(ema, weights, w)
    for actual, reference in zip(ema, expected, strict=True):
        assert actual.dtype == torch.float32
        assert _max_abs_error(actual, reference) <= 2e-6


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w", [1e-4, 0.01, 0.3, 1.0])
def test_lerp_float32_ema_of_half_weights(weight_dtype: torch.dtype, w: float) -> None:
    ema = [_random((6, 5), seed=5), _random((3,), seed=6)]
    weights = [_random((6, 5), seed=7, dtype=weight_dtype), _random((3,), seed=8, dtype=weight_dtype)]
    weights_before = [x.clone() for x in weights]
    expected = [_reference_lerp(e, x, w) for e, x in zip(ema, weights, strict=True)]
    lerp_(ema, weights, w)
    for actual, reference in zip(ema, expected, strict=True):
        assert actual.dtype == torch.float32
        assert _max_abs_error(actual, reference) <= 2e-6
    for x, before in zip(weights, weights_before, strict=True):
        assert x.dtype == weight_dtype
        assert torch.equal(x, before)


def test_lerp_small_step_is_not_rounded_away_in_float32() -> None:
    ema = [torch.ones(4)]
    weights = [torch.full((4,), 2.0, dtype=torch.bfloat16)]
    lerp_(ema, weights, 1e-4)
    # 1 + 1e-4 * (2 - 1) in float64, to float32 precision
    assert _max_abs_error(ema[0], [1.0001] * 4) <= 1e-7


def test_lerp_of_empty_lists_is_a_no_op() -> None:
    lerp_([], [], 0.5)


# ----------------------------------------------------------------------------------------------- copy_


def test_copy_same_dtype() -> None:
    source = [_random((2, 3), seed=1), _random((4,), seed=2)]
    destination = [torch.zeros(2, 3), torch.zeros(4)]
    pointers = [d.data_ptr() for d in destination]
    copy_(destination, source)
    for d, s in zip(destination, source, strict=True):
        assert torch.equal(d, s)
    assert [d.data_ptr() for d in destination] == pointers
    # a copy, not an alias
    source[0].add_(1.0)
    assert not torch.equal(destination[0], source[0])


def test_copy_converts_dtype() -> None:
    source = [_random((3, 3), seed=3, dtype=torch.bfloat16)]
    destination = [torch.zeros(3, 3, dtype=torch.float32)]
    copy_(destination, source)
    assert destination[0].dtype == torch.float32
    # every bfloat16 value is exactly representable in float32
    assert destination[0].tolist() == source[0].float().tolist()
    back = [torch.zeros(3, 3, dtype=torch.bfloat16)]
    copy_(back, destination)
    assert torch.equal(back[0], source[0])


def test_copy_integer_tensors() -> None:
    destination = [torch.tensor(0, dtype=torch.long)]
    copy_(destination, [torch.tensor(41, dtype=torch.long)])
    assert destination[0].item() == 41


def test_copy_into_parameter_keeps_it_a_leaf() -> None:
    parameter = nn.Parameter(torch.zeros(3))
    copy_([parameter], [torch.tensor([1.0, 2.0, 3.0])])
    assert parameter.tolist() == [1.0, 2.0, 3.0]
    assert parameter.is_leaf and parameter.requires_grad and parameter.grad_fn is None


def test_copy_of_empty_lists_is_a_no_op() -> None:
    copy_([], [])


# ----------------------------------------------------------------------------------------------- nonfinite_mask


def test_nonfinite_mask_flags_nan_and_infinities_only() -> None:
    tensors = [
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([1.0, NAN, 3.0]),
        torch.tensor([INF, 0.0]),
        torch.tensor([[0.0, -INF]]),
        torch.tensor([1e30, -1e30]),
        torch.tensor([3.0e38, -3.0e38]),  # close to float32's largest finite value
        torch.tensor(NAN),
        torch.tensor(5.0),
        torch.tensor([NAN, INF, -INF]),
        torch.zeros(4, 4),
    ]
    mask = nonfinite_mask(tensors)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [False, True, True, True, False, False, True, False, True, False]


def test_nonfinite_mask_large_values_of_many_elements_do_not_overflow() -> None:
    # The 2-norm of this tensor overflows float32; the check must not.
    tensors = [torch.full((1000,), 1e30), torch.full((10,), 3e38)]
    assert nonfinite_mask(tensors).tolist() == [False, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_nonfinite_mask_other_dtypes(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    tensors = [
        torch.tensor([1.0, 2.0], dtype=dtype),
        torch.tensor([big, -big], dtype=dtype),
        torch.tensor([1.0, NAN], dtype=dtype),
        torch.tensor([-INF], dtype=dtype),
    ]
    assert nonfinite_mask(tensors).tolist() == [False, False, True, True]


def test_nonfinite_mask_does_not_modify_its_input() -> None:
    tensors = [torch.tensor([1.0, NAN]), torch.tensor([-2.0, 3.0])]
    nonfinite_mask(tensors)
    assert tensors[1].tolist() == [-2.0, 3.0]
    assert tensors[0][0].item() == 1.0 and torch.isnan(tensors[0][1])


# ----------------------------------------------------------------------------------------------- exchange_


def _pointers(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def test_exchange_swaps_storage_without_copying() -> None:
    module = nn.Linear(3, 2)
    module.register_buffer("stat", torch.arange(4.0))
    first = [module.weight, module.bias, module.stat]
    first_ids = [id(t) for t in first]
    first_values = [t.detach().clone() for t in first]
    second = [_random((2, 3), seed=1), _random((2,), seed=2), _random((4,), seed=3)]
    second_values = [t.clone() for t in second]
    first_pointers, second_pointers = _pointers(first), _pointers(second)

    exchange_(first, second)

    # first now holds second's values in second's storage, and the reverse
    assert _pointers(first) == second_pointers
    assert _pointers(second) == first_pointers
    for t, expected in zip(first, second_values, strict=True):
        assert torch.equal(t.detach(), expected)
    for t, expected in zip(second, first_values, strict=True):
        assert torch.equal(t, expected)
    # the module's parameters are the same objects and still train
    assert [id(t) for t in first] == first_ids
    assert module.weight is first[0] and module.bias is first[1]
    assert isinstance(module.weight, nn.Parameter) and module.weight.requires_grad
    assert isinstance(module.bias, nn.Parameter) and module.bias.requires_grad
    assert module.stat.data_ptr() == second_pointers[2]
    # and autograd still reaches the parameters
    module(torch.ones(1, 3)).sum().backward()
    assert module.weight.grad is not None and module.weight.grad.shape == (2, 3)


def test_double_exchange_restores_pointers_and_values_bit_exactly() -> None:
    parameter = nn.Parameter(torch.tensor([1.0, -0.0, 3.5e-40, 7.25]))  # includes -0.0 and a subnormal
    frozen = nn.Parameter(torch.tensor([2.0, 3.0]), requires_grad=False)
    first = [parameter, frozen]
    raw_bits = [t.detach().view(torch.int32).clone() for t in first]
    second = [torch.tensor([9.0, 8.0, 7.0, 6.0]), torch.tensor([5.0, 4.0])]
    ema_bits = [t.view(torch.int32).clone() for t in second]
    first_pointers, second_pointers = _pointers(first), _pointers(second)

    exchange_(first, second)
    exchange_(first, second)

    assert _pointers(first) == first_pointers
    assert _pointers(second) == second_pointers
    for t, bits in zip(first, raw_bits, strict=True):
        assert torch.equal(t.detach().view(torch.int32), bits)
    for t, bits in zip(second, ema_bits, strict=True):
        assert torch.equal(t.view(torch.int32), bits)
    assert parameter.requires_grad and not frozen.requires_grad
    assert first[0] is parameter and first[1] is frozen


def test_exchange_keeps_requires_grad_flags() -> None:
    trainable = nn.Parameter(torch.zeros(2))
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    second = [torch.ones(2), torch.ones(2)]
    exchange_([trainable, frozen], second)
    assert trainable.requires_grad is True
    assert frozen.requires_grad is False
    assert trainable.tolist() == [1.0, 1.0] and frozen.tolist() == [1.0, 1.0]
    assert all(not t.requires_grad for t in second)


def test_exchange_requires_lists_of_equal_length() -> None:
    with pytest.raises(ValueError):
        exchange_([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)])


def test_nonfinite_mask_sum_screen_is_exact() -> None:
    # finite values whose float32 sum overflows must not be flagged; +inf and -inf together (sum NaN) must be
    overflowing = torch.tensor([3e38, 3e38, -1.0])
    both_infinities = torch.tensor([float("inf"), 1.0, float("-inf")])
    halves = torch.full((100_000,), 60_000.0, dtype=torch.float16)  # the float16 sum would overflow
    assert nonfinite_mask([overflowing, both_infinities, halves]).tolist() == [False, True, False]


# ----------------------------------------------------------------------------------------------- screen_into_


def _bits(tensor: torch.Tensor) -> list[int]:
    """The raw bit patterns of a float tensor (tells -0.0 from 0.0 and one NaN from another)."""
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().contiguous().view(integer).flatten().tolist()


def _slots(
    count: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    buffer = torch.full((count, 2), -1.0, dtype=dtype)
    return buffer, [(row[0], row[1]) for row in buffer.unbind()]


def test_screen_into_writes_each_sum_into_its_slot_in_place() -> None:
    tensors = [
        _random((3, 4), 1),
        _random((2, 3, 4, 5), 2).to(memory_format=torch.channels_last),  # not contiguous
        torch.tensor(2.5),  # 0-d
    ]
    buffer, slots = _slots(3)
    screen_into_(tensors, slots)
    for tensor, (value, untouched) in zip(tensors, buffer.tolist(), strict=True):
        assert value == pytest.approx(sum(tensor.double().flatten().tolist()), rel=1e-5, abs=1e-5)
        assert untouched == -1.0
    assert all(first._base is buffer for first, _ in slots)  # written in place, views of one buffer


def test_screen_into_float16_takes_min_and_max_which_cannot_overflow() -> None:
    tensors = [torch.full((100_000,), 60_000.0, dtype=torch.float16), torch.tensor([-3.0, 5.0], dtype=torch.float16)]
    buffer, slots = _slots(2, torch.float16)
    screen_into_(tensors, slots)
    assert buffer.tolist() == [[60_000.0, 60_000.0], [-3.0, 5.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_screen_into_flags_what_may_be_non_finite_and_finite_each_decides(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    tensors = [
        torch.tensor([1.0, 2.0], dtype=dtype),
        torch.tensor([1.0, NAN], dtype=dtype),
        torch.tensor([INF, -INF], dtype=dtype),  # sum NaN
        torch.tensor([-INF, 1.0], dtype=dtype),
        torch.tensor([big, big], dtype=dtype),  # finite, but the sum overflows
    ]
    buffer, slots = _slots(len(tensors), dtype)
    screen_into_(tensors, slots)
    flagged = [not bool(torch.isfinite(row).all()) for row in buffer]
    assert flagged[:4] == [False, True, True, True]
    assert flagged[4] == (dtype != torch.float16)  # a sum may overflow: only a screen
    assert finite_each(tensors) == [True, False, False, False, True]


# ----------------------------------------------------------------------------------------------- gated kernels


def _skip(value: float, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


@pytest.mark.parametrize("w", [1e-4, 0.1, 0.4999, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gated_lerp_applies_exactly_lerp_when_not_skipped(w: float, dtype: torch.dtype) -> None:
    ema = [_random((5, 7), 10, dtype), _random((3,), 11, dtype), _random((), 12, dtype)]
    weights = [_random(t.shape, 20 + i, dtype) for i, t in enumerate(ema)]
    expected = [e.clone() for e in ema]
    lerp_(expected, weights, w)
    reference = [_reference_lerp(e, x, w) for e, x in zip(ema, weights, strict=True)]
    gated_lerp_(ema, weights, w, _skip(0.0))
    for actual, wanted, ref in zip(ema, expected, reference, strict=True):
        assert _bits(actual) == _bits(wanted)  # the CPU path's numbers, bit for bit
        tolerance = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
        assert _max_abs_error(actual, ref) <= tolerance * 4


def test_gated_lerp_pairs_non_contiguous_weights_by_index() -> None:
    ema = [_random((2, 3, 4, 5), 1), _random((6,), 2)]
    weights = [_random((2, 3, 4, 5), 3).to(memory_format=torch.channels_last), _random((6,), 4)]
    expected = [e.clone().lerp_(w, 0.1) for e, w in zip(ema, weights, strict=True)]
    gated_lerp_(ema, weights, 0.1, _skip(0.0))
    assert [_bits(e) for e in ema] == [_bits(e) for e in expected]
    before = [_bits(e) for e in ema]
    gated_lerp_(ema, [w.fill_(NAN) for w in weights], 0.1, _skip(1.0))
    assert [_bits(e) for e in ema] == before


@pytest.mark.parametrize("w", [1e-4, 0.3, 0.5, 0.9])
def test_gated_lerp_skipped_leaves_every_bit_even_with_nonfinite_weights(w: float) -> None:
    ema = [torch.tensor([1.0, -0.0, 0.0, -2.5, 3e38]), torch.tensor([[NAN, 4.0]])]
    weights = [torch.tensor([NAN, INF, -INF, 1.0, 3e38]), torch.tensor([[1.0, NAN]])]
    before = [_bits(e) for e in ema]
    gated_lerp_(ema, weights, w, _skip(1.0))
    assert [_bits(e) for e in ema] == before


def test_a_lerp_with_weight_zero_cannot_skip_a_nan() -> None:
    """Why the gated kernels exist: ``lerp`` towards NaN with weight 0 is NaN, and -0.0 can come back as 0.0."""
    ema = torch.tensor([1.0, -0.0])
    ema.lerp_(torch.tensor([NAN, 1.0]), 0.0)
    assert torch.isnan(ema[0]) and _bits(ema[1:]) == _bits(torch.tensor([0.0]))


def test_gated_lerp_float32_ema_of_bfloat16_weights_lerps_towards_the_widened_weights() -> None:
    ema = [_random((64,), 1)]
    weights = [_random((64,), 2, torch.bfloat16)]
    expected = ema[0].clone().lerp_(weights[0].float(), 0.01)
    gated_lerp_(ema, weights, 0.01, _skip(0.0))
    assert _bits(ema[0]) == _bits(expected)
    assert _max_abs_error(ema[0], _reference_lerp(expected, weights[0], 0.0)) == 0.0


def test_lerp_float32_ema_of_bfloat16_weights_is_a_lerp_towards_the_widened_weights() -> None:
    ema = [_random((64,), 1)]
    weights = [_random((64,), 2, torch.bfloat16)]
    expected = ema[0].clone().lerp_(weights[0].float(), 0.01)
    lerp_(ema, weights, 0.01)
    assert _bits(ema[0]) == _bits(expected)


@pytest.mark.parametrize("skip", [0.0, 1.0])
def test_gated_copy(skip: float) -> None:
    destination = [torch.tensor([1.0, -0.0]), torch.tensor([3, 4])]
    source = [torch.tensor([NAN, 2.0], dtype=torch.float64), torch.tensor([5, 6])]
    before = [_bits(destination[0]), destination[1].tolist()]
    gated_copy_(destination, source, _skip(skip))
    if skip:
        assert [_bits(destination[0]), destination[1].tolist()] == before
    else:
        assert torch.isnan(destination[0][0]) and destination[0][1].item() == 2.0
        assert destination[0].dtype == torch.float32 and destination[1].tolist() == [5, 6]


def test_gated_kernels_and_the_mask_run_on_meta_tensors_where_nothing_can_be_read() -> None:
    """Meta tensors have no values: any `.item()` or `bool()` raises, so these kernels never read on the host."""
    ema = [torch.empty(4, 3, device="meta"), torch.empty((), device="meta")]
    weights = [torch.empty(4, 3, device="meta", dtype=torch.bfloat16), torch.empty((), device="meta")]
    with pytest.raises(RuntimeError):
        bool(ema[1])  # the premise
    mask = nonfinite_mask(weights)
    skip = mask.any().float()
    for w in (0.1, 0.7):
        gated_lerp_(ema, weights, w, skip)
    gated_copy_(ema, weights, skip)
    assert mask.device.type == "meta" and mask.shape == (2,)


def test_nonfinite_mask_with_empty_tensors_among_others() -> None:
    tensors = [torch.zeros(0), torch.tensor([NAN]), torch.zeros(0, 3), torch.tensor([1.0])]
    assert nonfinite_mask(tensors).tolist() == [False, True, False, False]

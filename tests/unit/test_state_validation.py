"""The one validation of an EMA state (lightning_ema._state_validation), on states built here by hand.

Each case is one kind of malformed input from issue 13; every one must end in a single EMAStateError (a
ValueError) whose message names the problem and where it is (state key, EMA index, tensor name).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_ema._state_validation import (
    FORMAT,
    VERSION,
    check_ema_state,
    check_emas,
    check_engine_state,
    check_tensors,
    dtype_fits,
)
from lightning_ema.errors import EMAStateError

KEY = "EMACallback{'decay': ['ConstantDecay(decay=0.9)', 'ConstantDecay(decay=0.99)'], 'include': None}"


def good_state() -> dict[str, Any]:
    ema = {"net.weight": torch.ones(3, 2), "net.bias": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(4)}
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": {"decays": ["ConstantDecay(decay=0.9)", "ConstantDecay(decay=0.99)"], "every_n_steps": 1},
        "num_updates": 4,
        "last_update_step": 4,
        "emas": [ema, {name: tensor.clone() for name, tensor in ema.items()}],
    }


def quiet(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Build a tensor whose constructor warns that its kind is beta or deprecated (the point of these cases)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make()


RAW = {"net.weight": torch.ones(3, 2), "net.bias": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(4)}


def edit(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    state = good_state()
    change(state)
    return state


def set_tensor(name: str, value: object, index: int = 1) -> Callable[[dict[str, Any]], object]:
    return lambda state: state["emas"][index].__setitem__(name, value)


# (the state, words the message must hold)
MALFORMED: dict[str, tuple[Any, list[str]]] = {
    "not a dict": ([1, 2], ["must be a dict", "list"]),
    "other format": (edit(lambda s: s.__setitem__("format", "timm")), ["not an EMACallback state", "'timm'"]),
    "missing version": (edit(lambda s: s.pop("version")), ["has no `version`"]),
    "future version": (edit(lambda s: s.__setitem__("version", VERSION + 1)), ["version 3", "Upgrade lightning-ema"]),
    "version as text": (edit(lambda s: s.__setitem__("version", "2")), ["`version` must be an integer", "'2'"]),
    "version zero": (edit(lambda s: s.__setitem__("version", 0)), ["`version` must be an integer >= 1"]),
    "missing counter": (edit(lambda s: s.pop("num_updates")), ["lacks ['num_updates']"]),
    "negative counter": (edit(lambda s: s.__setitem__("last_update_step", -1)), ["`last_update_step`", "-1"]),
    "bool counter": (edit(lambda s: s.__setitem__("num_updates", True)), ["`num_updates`", "True"]),
    "config not a dict": (edit(lambda s: s.__setitem__("config", ["x"])), ["`config` must be a dict"]),
    "missing emas": (edit(lambda s: s.pop("emas")), ["lacks its EMA tensors (`emas`)"]),
    "emas as a dict": (
        edit(lambda s: s.__setitem__("emas", {"0": s["emas"][0]})),
        ["`emas` must be a list", "dict"],
    ),
    "emas as a string": (edit(lambda s: s.__setitem__("emas", "tensors")), ["`emas` must be a list", "str"]),
    "an EMA that is a list": (
        edit(lambda s: s["emas"].__setitem__(1, [torch.ones(3)])),
        ["EMA 1 (ConstantDecay(decay=0.99))", "must be a dict of tensors", "list"],
    ),
    "fewer decays than EMAs (list used to crash in zip)": (
        edit(lambda s: s["config"].__setitem__("decays", ["ConstantDecay(decay=0.9)"])),
        ["holds 2 EMAs but describes 1 decays"],
    ),
    "decays not a list": (edit(lambda s: s["config"].__setitem__("decays", "0.9")), ["config['decays']"]),
    "version 1 with emas": (edit(lambda s: s.__setitem__("version", 1)), ["version 1", "`emas`"]),
    "string value": (edit(set_tensor("net.bias", "0.0")), ["EMA 1", "'net.bias' is a str, not a tensor"]),
    "list value": (edit(set_tensor("net.bias", [0.0, 0.0, 0.0])), ["'net.bias' is a list, not a tensor"]),
    "name not a string": (edit(set_tensor(3, torch.ones(1))), ["name 3 is not a non-empty string"]),  # type: ignore[arg-type]
    "meta tensor": (edit(set_tensor("net.bias", torch.empty(3, device="meta"))), ["'net.bias' is a meta tensor"]),
    "sparse COO tensor": (edit(set_tensor("net.weight", torch.ones(3, 2).to_sparse())), ["torch.sparse_coo"]),
    "sparse CSR tensor": (
        edit(set_tensor("net.weight", quiet(lambda: torch.ones(3, 2).to_sparse_csr()))),
        ["torch.sparse_csr"],
    ),
    "quantized tensor": (
        edit(set_tensor("net.bias", quiet(lambda: torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8)))),
        ["'net.bias'", "torch.qint8"],
    ),
    "NaN": (
        edit(set_tensor("net.weight", torch.tensor([[1.0, float("nan")], [1.0, 1.0], [1.0, 1.0]]))),
        ["EMA 1 (ConstantDecay(decay=0.99))", "'net.weight' holds 1 NaN or infinite value (of 6)"],
    ),
    "infinity": (edit(set_tensor("net.bias", torch.tensor([0.0, float("inf"), -float("inf")]))), ["holds 2 NaN"]),
    "complex NaN": (edit(set_tensor("net.bias", torch.full((3,), complex(0, float("nan"))))), ["holds 3 NaN"]),
    "EMAs with different names": (edit(lambda s: s["emas"][1].pop("net.bias")), ["EMA 1", "'net.bias' is missing"]),
    "EMAs with different shapes": (
        edit(set_tensor("net.weight", torch.ones(2, 3))),
        ["EMA 1", "'net.weight' is (2, 3) torch.float32 but (3, 2) torch.float32 in EMA 0"],
    ),
    "EMAs with different dtypes": (
        edit(set_tensor("net.bias", torch.zeros(3, dtype=torch.float64))),
        ["'net.bias' is (3,) torch.float64 but (3,) torch.float32"],
    ),
    "sharded names missing (meta.pt alone)": (
        edit(lambda s: s.__setitem__("sharded", ["net.shard"])),
        ["lacks the EMA shards of ['net.shard']"],
    ),
    "sharded not a list": (edit(lambda s: s.__setitem__("sharded", "net.weight")), ["`sharded` must be a list"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_state_is_one_ema_state_error_naming_the_problem(case: str) -> None:
    state, words = MALFORMED[case]
    with pytest.raises(EMAStateError) as info:
        check_ema_state(state, state_key=KEY, weights=RAW)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, message
    if case != "not a dict":
        assert repr(KEY) in message  # where: the state's key


def test_missing_version_does_not_say_upgrade() -> None:
    with pytest.raises(EMAStateError) as info:
        check_ema_state(edit(lambda s: s.pop("version")))
    assert "Upgrade" not in str(info.value)


def test_a_good_state_comes_back_normalised() -> None:
    state = good_state()
    checked = check_ema_state(state, state_key=KEY, weights=RAW)
    assert checked["emas"] == [dict(ema) for ema in state["emas"]]
    assert all(type(ema) is dict for ema in checked["emas"])
    assert checked["config"]["decays"] == state["config"]["decays"]
    assert (checked["num_updates"], checked["last_update_step"]) == (4, 4)


def test_version_1_layout_is_read_as_version_2() -> None:
    ema = {"w": torch.ones(2)}
    old = {"format": FORMAT, "version": 1, "config": {"decay": "ConstantDecay(decay=0.9)"}, "num_updates": 1,
           "last_update_step": 1, "ema": ema}  # fmt: skip
    checked = check_ema_state(old)
    assert checked["emas"] == [ema]
    assert checked["config"]["decays"] == ["ConstantDecay(decay=0.9)"]
    assert "decay" not in checked["config"]


def test_layout_only_check_leaves_tensors_unread() -> None:
    state = edit(set_tensor("net.bias", torch.full((3,), float("nan"))))
    assert check_ema_state(state, tensors=False)["emas"][1]["net.bias"].isnan().all()
    with pytest.raises(EMAStateError, match="NaN"):
        check_ema_state(state)


@pytest.mark.parametrize(
    ("name", "tensor", "words"),
    [
        (
            "net.weight",
            torch.ones(3, 2, dtype=torch.int64),
            "'net.weight' is torch.int64 but its weight is torch.float32",
        ),
        ("bn.num_batches_tracked", torch.tensor(4.0), "is torch.float32 but its weight is torch.int64"),
        ("net.weight", torch.ones(2, 3), "'net.weight' has shape (2, 3) but its weight (3, 2)"),
    ],
)
def test_an_ema_that_does_not_fit_its_raw_weight_is_refused(name: str, tensor: torch.Tensor, words: str) -> None:
    state = good_state()
    for ema in state["emas"]:
        ema[name] = tensor.clone()
    with pytest.raises(EMAStateError) as info:
        check_ema_state(state, state_key=KEY, weights=RAW)
    assert words in str(info.value)
    assert "does not fit the weights it averages" in str(info.value)


def test_a_wider_or_narrower_float_ema_fits_a_float_weight() -> None:
    state = good_state()
    for ema in state["emas"]:
        ema["net.weight"] = ema["net.weight"].double()
    raw = {**RAW, "net.weight": torch.ones(3, 2, dtype=torch.bfloat16)}
    check_ema_state(state, weights=raw)


def test_dtype_fits() -> None:
    assert dtype_fits(torch.float32, torch.bfloat16)
    assert dtype_fits(torch.float16, torch.float64)
    assert dtype_fits(torch.complex64, torch.complex128)
    assert dtype_fits(torch.int64, torch.int64)
    assert not dtype_fits(torch.int64, torch.float32)
    assert not dtype_fits(torch.float32, torch.int64)
    assert not dtype_fits(torch.int32, torch.int64)
    assert not dtype_fits(torch.float32, torch.complex64)
    assert not dtype_fits(torch.bool, torch.uint8)


def test_check_tensors_lists_every_offending_name_for_foreign_layouts() -> None:
    tensors = {"a": torch.ones(1), "b": "x", "c": torch.empty(2, device="meta"), "d": torch.tensor([float("nan")])}
    with pytest.raises(EMAStateError) as info:
        check_tensors(tensors, where="timm checkpoint 'model.pth', state_dict_ema")
    message = str(info.value)
    assert message.startswith("timm checkpoint 'model.pth', state_dict_ema: ")
    assert "'b' is a str" in message and "'c' is a meta tensor" in message and "'d' holds 1 NaN" in message
    assert "'a'" not in message
    assert check_tensors({"d": torch.tensor([float("nan")])}, where="raw", finite=False)["d"].isnan().all()


def test_check_emas_refuses_an_empty_or_odd_list() -> None:
    with pytest.raises(EMAStateError, match="empty list"):
        check_emas([], where="x")
    with pytest.raises(EMAStateError, match="must hold a list of EMAs"):
        check_emas({"w": torch.ones(1)}, where="x")


def test_engine_state_checks_counters_count_and_tensors() -> None:
    ema = {"w": torch.ones(2)}
    assert check_engine_state({"num_updates": 1, "last_update_step": 2, "ema": ema}, num_emas=1)["emas"] == [ema]
    with pytest.raises(EMAStateError, match="holds 2 EMAs but 1 decays"):
        check_engine_state({"num_updates": 1, "last_update_step": 2, "emas": [ema, ema]}, num_emas=1)
    with pytest.raises(EMAStateError, match="holds 1 NaN"):
        check_engine_state(
            {"num_updates": 1, "last_update_step": 2, "emas": [{"w": torch.tensor([float("nan")])}]}, num_emas=1
        )
    with pytest.raises(EMAStateError, match="must be a dict"):
        check_engine_state(None, num_emas=1)


def test_the_state_is_not_modified() -> None:
    state = good_state()
    before = copy.deepcopy(state)
    check_ema_state(state, weights=RAW)
    assert state.keys() == before.keys()
    assert state["config"] == before["config"]
    assert [list(ema) for ema in state["emas"]] == [list(ema) for ema in before["emas"]]

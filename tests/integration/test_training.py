"""EMACallback in a real Trainer on CPU: values, update counts, evaluation swaps, bf16, logging."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from support import (
    TinyClassifier,
    WeightRecorder,
    assert_close_to_reference,
    constant_decay,
    make_loader,
    reference_ema,
    snapshot,
    trainer_kwargs,
    warmup_decay,
)

from lightning_ema import EMACallback
from lightning_ema.schedules import WarmupDecay


def fit(callback: EMACallback, *, max_epochs: int = 2, model: TinyClassifier | None = None, **kwargs: object):
    model = model or TinyClassifier()
    recorder = WeightRecorder()
    trainer = L.Trainer(callbacks=[recorder, callback], max_epochs=max_epochs, **trainer_kwargs(**kwargs))
    trainer.fit(model, make_loader(), make_loader(n=16))
    return trainer, model, recorder


@pytest.mark.parametrize(
    ("decay", "decay_at"),
    [(0.9, constant_decay(0.9)), (WarmupDecay(decay=0.99, warmup=10), warmup_decay(0.99, 10))],
    ids=["constant", "warmup"],
)
def test_ema_after_training_matches_plain_loop(decay, decay_at) -> None:
    callback = EMACallback(decay=decay)
    trainer, model, recorder = fit(callback, max_epochs=3)
    assert trainer.global_step == 24
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, decay_at)
    assert_close_to_reference(callback.ema_state_dict(), expected)
    # integer buffers are copied, not averaged
    ema = callback.ema_state_dict()
    assert torch.equal(ema["net.1.num_batches_tracked"], model.net[1].num_batches_tracked)
    assert callback.num_updates == 24


@pytest.mark.parametrize(("accumulate", "every_n", "start_step"), [(3, 1, 0), (2, 3, 0), (1, 4, 5), (4, 2, 3)])
def test_update_count_under_accumulation_and_every_n_steps(accumulate: int, every_n: int, start_step: int) -> None:
    callback = EMACallback(decay=0.8, every_n_steps=every_n, start_step=start_step)
    trainer, _, recorder = fit(callback, max_epochs=3, accumulate_grad_batches=accumulate)
    # 8 batches per epoch; Lightning steps at the end of an epoch even with an incomplete accumulation window
    steps_per_epoch = -(-8 // accumulate)
    assert trainer.global_step == 3 * steps_per_epoch
    assert recorder.steps == list(range(1, trainer.global_step + 1))
    expected_updates = sum(1 for t in range(1, trainer.global_step + 1) if t % every_n == 0)
    assert callback.num_updates == expected_updates
    expected = reference_ema(
        recorder.initial,
        recorder.steps,
        recorder.states,
        constant_decay(0.8),
        every_n_steps=every_n,
        start_step=start_step,
    )
    assert_close_to_reference(callback.ema_state_dict(), expected)


def test_no_extra_update_at_epoch_end_with_manual_count() -> None:
    """Two epochs of 8 batches with accumulation 3: steps happen after batches 3, 6, 8 of each epoch."""

    class CountingCallback(L.Callback):
        def __init__(self) -> None:
            self.optimizer_steps = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
            self.optimizer_steps += 1

    counter = CountingCallback()
    callback = EMACallback(decay=0.5)
    trainer = L.Trainer(callbacks=[counter, callback], max_epochs=2, **trainer_kwargs(accumulate_grad_batches=3))
    trainer.fit(TinyClassifier(), make_loader())
    assert counter.optimizer_steps == 6
    assert callback.num_updates == 6


class RawWeightsCheck(L.Callback):
    """Placed before the EMACallback: snapshots raw weights when validation starts, compares when training resumes."""

    def __init__(self) -> None:
        self.before_validation: dict[str, torch.Tensor] | None = None
        self.compared = 0

    def on_validation_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.before_validation = snapshot(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.before_validation is not None:
            after = snapshot(pl_module)
            for name, tensor in self.before_validation.items():
                assert torch.equal(after[name], tensor), name
            self.before_validation = None
            self.compared += 1


def test_validation_sees_ema_and_training_resumes_with_bit_exact_raw_weights() -> None:
    callback = EMACallback(decay=0.7)
    check = RawWeightsCheck()
    recorder = WeightRecorder()
    model = TinyClassifier()
    trainer = L.Trainer(callbacks=[recorder, check, callback], max_epochs=3, **trainer_kwargs(val_check_interval=4))
    trainer.fit(model, make_loader(), make_loader(n=16))
    # validation after steps 4, 8, 12, ... (twice per epoch), the last one of the run has no training after it
    assert len(model.seen_in["validate"]) == 6
    assert check.compared == 5
    for index, seen in enumerate(model.seen_in["validate"]):
        step = 4 * (index + 1)
        position = recorder.steps.index(step) + 1
        expected = reference_ema(
            recorder.initial, recorder.steps[:position], recorder.states[:position], constant_decay(0.7)
        )
        assert_close_to_reference(seen, expected)
        raw = recorder.states[position - 1]
        assert not torch.equal(seen["net.0.weight"], raw["net.0.weight"])


def test_sanity_check_test_and_predict_use_the_ema() -> None:
    callback = EMACallback(decay=0.7)
    model = TinyClassifier()
    trainer = L.Trainer(callbacks=[callback], max_epochs=2, **trainer_kwargs(num_sanity_val_steps=1))
    trainer.fit(model, make_loader(), make_loader(n=16))
    # the sanity check runs before any step: the EMA is a copy of the initial weights
    assert len(model.seen_in["validate"]) == 3
    raw = snapshot(model)
    ema = {name: tensor.clone() for name, tensor in callback.ema_state_dict().items()}
    trainer.test(model, make_loader(n=16), verbose=False)
    trainer.predict(model, make_loader(n=16))
    for stage in ("test", "predict"):
        (seen,) = model.seen_in[stage]
        for name in ema:
            assert torch.equal(seen[name], ema[name]), (stage, name)
    after = snapshot(model)
    for name in raw:
        assert torch.equal(after[name], raw[name]), name


def test_evaluate_raw_leaves_the_raw_weights_in_place() -> None:
    callback = EMACallback(decay=0.7, evaluate="raw")
    model = TinyClassifier()
    recorder = WeightRecorder()
    trainer = L.Trainer(callbacks=[recorder, callback], max_epochs=1, **trainer_kwargs())
    trainer.fit(model, make_loader(), make_loader(n=16))
    (seen,) = model.seen_in["validate"]
    for name, tensor in recorder.states[-1].items():
        assert torch.equal(seen[name], tensor), name
    assert not torch.equal(callback.ema_state_dict()["net.0.weight"], seen["net.0.weight"])


def test_apply_at_end_copies_the_ema_into_the_model() -> None:
    callback = EMACallback(decay=0.7, apply_at_end=True)
    _, model, recorder = fit(callback, max_epochs=2)
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(0.7))
    assert_close_to_reference(snapshot(model), expected)
    assert not torch.equal(model.net[0].weight, recorder.states[-1]["net.0.weight"])


def test_decay_is_logged_through_the_logger(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    callback = EMACallback(decay=WarmupDecay(decay=0.999, warmup=10))
    trainer = L.Trainer(
        callbacks=[callback],
        max_epochs=1,
        **trainer_kwargs(logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1),
    )
    trainer.fit(TinyClassifier(), make_loader())
    import csv

    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("ema/decay")]
    logged = {int(row["step"]): float(row["ema/decay"]) for row in rows}
    # Lightning's CSV "step" column is the step index before the optimizer step (t - 1)
    assert logged, "ema/decay was not logged"
    for index, value in logged.items():
        t = index + 1
        assert value == pytest.approx(min(0.999, (1 + t) / (10 + t)), rel=1e-6)


def test_several_callbacks_log_under_distinct_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning.pytorch.loggers import CSVLogger

    first, second = EMACallback(decay=0.9), EMACallback(decay=0.99, evaluate="raw")
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(callbacks=[first, second], max_epochs=1, **trainer_kwargs(logger=logger, log_every_n_steps=1))
    trainer.fit(TinyClassifier(), make_loader())
    assert trainer.logged_metrics["ema/decay/0"].item() == pytest.approx(0.9)
    assert trainer.logged_metrics["ema/decay/1"].item() == pytest.approx(0.99)


def test_decay_is_logged_only_on_the_steps_loggers_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run")
    callback = EMACallback(decay=0.9, every_n_steps=3, distance_every_n_steps=2)
    trainer = L.Trainer(callbacks=[callback], max_epochs=3, **trainer_kwargs(logger=logger, log_every_n_steps=5))
    trainer.fit(TinyClassifier(), make_loader())
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # Lightning writes after steps 5, 10, 15, 20 (CSV step = step - 1): every 5th, whatever the update interval
    decay_steps = [int(row["step"]) for row in rows if row.get("ema/decay")]
    distance_steps = [int(row["step"]) for row in rows if row.get("ema/distance")]
    assert decay_steps == [4, 9, 14, 19]
    assert distance_steps == [4, 9, 14, 19]


def test_an_ema_that_only_copies_logs_its_decay_and_no_distance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning.pytorch.loggers import CSVLogger

    # Only BatchNorm statistics, copied: nothing is averaged, so there is no distance to log (this used to crash).
    callback = EMACallback(decay=0.9, buffers="copy", include="net.1.running_*", distance_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(callbacks=[callback], max_epochs=1, **trainer_kwargs(logger=logger, log_every_n_steps=1))
    model = TinyClassifier()
    trainer.fit(model, make_loader())
    assert "ema/decay" in trainer.logged_metrics and "ema/distance" not in trainer.logged_metrics
    assert torch.equal(callback.ema_state_dict()["net.1.running_mean"], model.net[1].running_mean)


def test_bf16_weights_with_decay_0_9999_still_move_the_ema() -> None:
    callback = EMACallback(decay=0.9999)
    model = TinyClassifier(lr=0.5)
    recorder = WeightRecorder()
    trainer = L.Trainer(callbacks=[recorder, callback], max_epochs=5, **trainer_kwargs(precision="bf16-true"))
    trainer.fit(model, make_loader())
    assert model.net[0].weight.dtype == torch.bfloat16
    ema = callback.ema_state_dict()
    assert ema["net.0.weight"].dtype == torch.float32
    initial = recorder.initial
    moved = (ema["net.0.weight"].double() - initial["net.0.weight"].double()).abs().max().item()
    assert moved > 0
    expected = reference_ema(initial, recorder.steps, recorder.states, constant_decay(0.9999))
    assert_close_to_reference(ema, expected, atol=1e-6)
    # the same update done in bf16 arithmetic rounds away: most entries would never leave their start
    bf16_ema = initial["net.0.weight"].clone()
    for state in recorder.states:
        bf16_ema = (0.9999 * bf16_ema + 0.0001 * state["net.0.weight"]).to(torch.bfloat16)
    stuck_in_bf16 = (bf16_ema == initial["net.0.weight"]).float().mean().item()
    moved_in_float32 = (ema["net.0.weight"] != initial["net.0.weight"].float()).float().mean().item()
    assert stuck_in_bf16 > 0.8
    assert moved_in_float32 > 0.95


def test_several_callbacks_that_would_swap_are_refused() -> None:
    trainer = L.Trainer(callbacks=[EMACallback(decay=0.9), EMACallback(decay=0.99)], max_epochs=1, **trainer_kwargs())
    with pytest.raises(ValueError, match="evaluate='raw'"):
        trainer.fit(TinyClassifier(), make_loader())

"""Defects found by reviewing MeanTeacherModule as a semi-supervised user runs it (real Trainer, files on disk).

Expected values come from a second, uninterrupted run or from the plain float64 loop over the student weights
``StudentRecorder`` saw after each optimizer step, never from the code under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import assert_close_to_reference, constant_decay, load, snapshot, trainer_kwargs
from test_mean_teacher import StudentRecorder, TinyMeanTeacher, assert_equal_states, prefixed
from torch.utils.data import DataLoader, TensorDataset


def same_batch_loader() -> DataLoader:
    """Eight copies of one batch: a run resumed mid-epoch sees the same data as the uninterrupted one.

    (Lightning restarts a plain DataLoader from its first batch when it resumes mid-epoch.)
    """
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    return DataLoader(TensorDataset(x.repeat(8, 1), y.repeat(8)), batch_size=8)


class CrashAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def run(model: TinyMeanTeacher, callbacks: list[L.Callback], ckpt_path: Path | None = None, **kwargs: Any) -> None:
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer = L.Trainer(callbacks=callbacks, max_epochs=3, **trainer_kwargs(**kwargs))
    trainer.fit(model, same_batch_loader(), ckpt_path=ckpt_path)


STEP_CHECKPOINT_CASES = {
    "every-step": (dict(teacher_decay=0.9), {}, 3),
    "every2-start3-accumulate2": (
        dict(teacher_decay=0.9, every_n_steps=2, start_step=3),
        {"accumulate_grad_batches": 2},
        5,
    ),
}


@pytest.mark.parametrize("case", list(STEP_CHECKPOINT_CASES))
def test_a_checkpoint_saved_every_n_train_steps_holds_that_steps_teacher_and_resumes_bit_for_bit(
    tmp_path: Path, case: str
) -> None:
    # ModelCheckpoint's on_train_batch_end runs before the module's, where the teacher is updated: the checkpoint
    # held the teacher and counters of the step before, and the resumed run never applied the missing update.
    options, kwargs, every = STEP_CHECKPOINT_CASES[case]
    whole = TinyMeanTeacher(**options)
    run(whole, [], **kwargs)

    recorder = StudentRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(TinyMeanTeacher(**options), [recorder, checkpoints, CrashAtStep(2 * every + 1)], **kwargs)
    path = tmp_path / f"step={2 * every}.ckpt"
    saved = load(path)
    assert saved["global_step"] == 2 * every
    every_n, start = options.get("every_n_steps", 1), options.get("start_step", 0)
    due = [t for t in recorder.steps if t <= 2 * every and t % every_n == 0]
    assert saved["mean_teacher"]["num_updates"] == len(due)
    assert saved["mean_teacher"]["last_update_step"] == due[-1]
    expected = recorder.reference(constant_decay(0.9), upto=2 * every, every_n_steps=every_n, start_step=start)
    assert_close_to_reference(prefixed(saved["state_dict"], "teacher."), expected)

    resumed = TinyMeanTeacher(**options)
    run(resumed, [], ckpt_path=path, **kwargs)
    assert resumed.num_teacher_updates == whole.num_teacher_updates
    assert_equal_states(snapshot(resumed), snapshot(whole))


class EvaluatesWithoutSuper(TinyMeanTeacher):
    """Overrides the evaluation hooks without super(): the teacher's weights never reach the student."""

    def on_validation_model_eval(self) -> None:
        self.eval()

    def on_test_model_eval(self) -> None:
        self.eval()


@pytest.mark.parametrize(("entry", "stage"), [("validate", "validation"), ("test", "test")])
def test_validate_or_test_alone_refuses_an_evaluation_hook_overridden_without_super(entry: str, stage: str) -> None:
    # The guard that checks the hooks was attached only when training started: `validate` and `test` on their
    # own evaluated the student and reported it as the teacher.
    model = EvaluatesWithoutSuper()
    trainer = L.Trainer(**trainer_kwargs())
    with pytest.raises(
        RuntimeError, match=rf"{stage} should run with the teacher's weights.*on_{stage}_model_eval` must call super"
    ):
        getattr(trainer, entry)(model, same_batch_loader())

"""The public surface is pinned: adding or removing a name is a deliberate change."""

import lightning_ema
import lightning_ema.compat
import lightning_ema.formats
import lightning_ema.schedules


def test_top_level_names() -> None:
    assert lightning_ema.__all__ == sorted(lightning_ema.__all__)
    assert set(lightning_ema.__all__) == {
        "EMA",
        "EMACallback",
        "EMAStateError",
        "MeanTeacherModule",
        "NonFiniteUpdateError",
        "PostHocEMA",
        "__version__",
        "export_ema",
        "load_ema_state_dict",
    }
    for name in lightning_ema.__all__:
        assert hasattr(lightning_ema, name), name


def test_schedule_names() -> None:
    assert lightning_ema.schedules.__all__ == sorted(lightning_ema.schedules.__all__)
    assert set(lightning_ema.schedules.__all__) == {
        "ConfigValue",
        "ConstantDecay",
        "CosineDecay",
        "DecaySchedule",
        "ExponentialRampDecay",
        "HalfLifeDecay",
        "KarrasDecay",
        "MomentumWarmupDecay",
        "PowerDecay",
        "WarmupDecay",
        "as_schedule",
        "normalize_repr",
    }


def test_migration_names() -> None:
    assert lightning_ema.compat.__all__ == sorted(lightning_ema.compat.__all__)
    assert set(lightning_ema.compat.__all__) == {
        "MMCVEMAHook",
        "MMYOLOExpMomentumEMA",
        "MMagicEMAHook",
        "TimmModelEma",
        "mean_teacher_hook_args",
    }
    assert set(lightning_ema.formats.FOREIGN_FORMATS) == {
        "diffusers",
        "ema-pytorch",
        "lightning",
        "mean-teacher",
        "mmagic",
        "mmcv",
        "mmengine",
        "nemo",
        "timm",
        "torch-ema",
    }


def test_errors_are_value_errors_where_they_report_bad_input() -> None:
    assert issubclass(lightning_ema.EMAStateError, ValueError)
    assert issubclass(lightning_ema.NonFiniteUpdateError, FloatingPointError)

"""Post-hoc EMA math and files, against references written here: NumPy least squares, numerical integrals,
plain Python loops of the per-step power-function decay. No Lightning."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ema import posthoc


def gamma_of(sigma_rel: float) -> float:
    """EDM2's relation solved independently: the largest root of g^3 + 7g^2 + (16 - s)g + (12 - s), s = sigma^-2."""
    s = sigma_rel**-2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def inner_products_numpy(ta, ga, tb, gb) -> np.ndarray:  # type: ignore[no-untyped-def]
    """<p_a, p_b> = int_0^min(ta, tb) (ga+1) x^ga / ta^(ga+1) * (gb+1) x^gb / tb^(gb+1) dx, integrated by hand."""
    ta, ga = np.asarray(ta, float)[:, None], np.asarray(ga, float)[:, None]
    tb, gb = np.asarray(tb, float)[None, :], np.asarray(gb, float)[None, :]
    m = np.minimum(ta, tb)
    return (ga + 1) * (gb + 1) * m ** (ga + gb + 1) / ((ga + gb + 1) * ta ** (ga + 1) * tb ** (gb + 1))


def profile(t: float, gamma: float, x: np.ndarray) -> np.ndarray:
    return np.where(x <= t, (gamma + 1) * x**gamma / t ** (gamma + 1), 0.0)


def test_inner_products_match_numerical_integration() -> None:
    x = np.linspace(0.0, 1.0, 400_001)
    cases = [(1.0, 6.94, 0.6, 16.97), (0.3, 0.0, 1.0, 2.5), (0.8, 16.97, 0.8, 16.97)]
    for ta, ga, tb, gb in cases:
        numeric = np.trapezoid(profile(ta, ga, x) * profile(tb, gb, x), x)
        closed = float(posthoc.profile_inner_products([ta], [ga], [tb], [gb]))
        assert closed == pytest.approx(numeric, rel=1e-4), (ta, ga, tb, gb)


def test_coefficients_equal_a_numpy_least_squares_solve() -> None:
    steps = np.repeat([200.0, 400.0, 600.0, 800.0, 1000.0], 2)
    gammas = np.tile([gamma_of(0.05), gamma_of(0.10)], 5)
    for sigma_rel in (0.03, 0.07, 0.13):
        gamma = gamma_of(sigma_rel)
        a = inner_products_numpy(steps / 1000, gammas, steps / 1000, gammas)
        b = inner_products_numpy(steps / 1000, gammas, [1.0], [gamma])[:, 0]
        expected = np.linalg.lstsq(a, b, rcond=None)[0]
        expected /= expected.sum()
        actual = posthoc.solve_coefficients(steps.tolist(), gammas.tolist(), 1000, gamma).numpy()
        assert np.allclose(actual, expected, rtol=1e-6, atol=1e-9), (sigma_rel, actual, expected)
        assert actual.sum() == pytest.approx(1.0, abs=1e-12)


def test_profile_error_matches_the_numerical_l2_norm_of_the_residual() -> None:
    steps, gammas = [500.0, 500.0, 1000.0, 1000.0], [gamma_of(0.05), gamma_of(0.1)] * 2
    x = np.linspace(0.0, 1000.0, 400_001)
    for sigma_rel in (0.07, 0.2):
        gamma = gamma_of(sigma_rel)
        coefficients = posthoc.solve_coefficients(steps, gammas, 1000, gamma).numpy()
        combined = sum(c * profile(t, g, x) for c, t, g in zip(coefficients, steps, gammas, strict=True))
        target = profile(1000.0, gamma, x)
        numeric = math.sqrt(np.trapezoid((combined - target) ** 2, x) / np.trapezoid(target**2, x))
        actual = posthoc.profile_error(steps, gammas, coefficients, 1000, gamma)
        assert actual == pytest.approx(numeric, rel=2e-3, abs=1e-6), sigma_rel


def karras_trajectory(steps: int, gammas: list[float], seed: int = 0) -> tuple[list[dict], list[list[dict]]]:
    """A random-walk 'model' and its power-function EMAs after every step, by a plain loop over per-step decays."""
    generator = torch.Generator().manual_seed(seed)
    w = {"a": torch.randn(3, 4, generator=generator, dtype=torch.float64), "b": torch.randn(5, generator=generator)}
    w["b"] = w["b"].double()
    drift = {name: torch.randn(t.shape, generator=generator, dtype=torch.float64) for name, t in w.items()}
    emas = [{name: t.clone() for name, t in w.items()} for _ in gammas]
    weights, history = [], []
    for s in range(1, steps + 1):
        w = {
            n: t + 0.01 * drift[n] + 0.05 * torch.randn(t.shape, generator=generator, dtype=torch.float64)
            for n, t in w.items()
        }
        for ema, gamma in zip(emas, gammas, strict=True):
            decay = (1.0 - 1.0 / s) ** (gamma + 1.0)
            for name in ema:
                ema[name] = decay * ema[name] + (1.0 - decay) * w[name]
        weights.append(w)
        history.append([{n: t.clone() for n, t in ema.items()} for ema in emas])
    return weights, history


def write_run(folder: Path, history, every: int, sigma_rels, file_format: str = "torch", dtype=torch.float32) -> None:  # type: ignore[no-untyped-def]
    for step in range(every, len(history) + 1, every):
        emas = [{n: t.to(dtype) for n, t in ema.items()} for ema in history[step - 1][: len(sigma_rels)]]
        emas[0]["count"] = torch.tensor(step)  # an integer buffer: copied from the snapshot of the step read
        emas[1]["count"] = torch.tensor(step)
        name = posthoc.snapshot_filename(step, file_format=file_format)
        posthoc.write_snapshot(
            folder / name,
            step=step,
            sigma_rels=sigma_rels,
            gammas=[gamma_of(s) for s in sigma_rels],
            emas=emas,
        )


SIGMAS = (0.05, 0.10)


@pytest.mark.parametrize("file_format", ["torch", "safetensors"])
def test_synthesis_is_close_to_the_exact_ema_inside_the_tracked_range(tmp_path: Path, file_format: str) -> None:
    targets = (0.07, 0.085)
    gammas = [gamma_of(s) for s in (*SIGMAS, *targets)]
    weights, history = karras_trajectory(600, gammas)
    write_run(tmp_path, history, 20, SIGMAS, file_format)
    raw = weights[-1]
    for index, sigma in enumerate(targets, start=2):
        synthesised = posthoc.synthesize(tmp_path, sigma)
        exact = history[-1][index]
        numerator = math.sqrt(sum(float(((synthesised[n].double() - exact[n]) ** 2).sum()) for n in exact))
        denominator = math.sqrt(sum(float(((exact[n] - raw[n]) ** 2).sum()) for n in exact))
        assert numerator / denominator < 0.01, (sigma, numerator / denominator)
        assert synthesised["a"].dtype == torch.float32
        assert torch.equal(synthesised["count"], torch.tensor(600))
        assert posthoc.reconstruction_error(tmp_path, sigma) < 3e-3


def test_a_tracked_width_at_a_snapshot_step_is_that_snapshot(tmp_path: Path) -> None:
    _, history = karras_trajectory(100, [gamma_of(s) for s in SIGMAS])
    write_run(tmp_path, history, 10, SIGMAS, dtype=torch.float64)
    for step in (50, 100):
        synthesised = posthoc.synthesize(tmp_path, 0.10, step=step)
        assert synthesised["a"].dtype == torch.float64
        for name in ("a", "b"):
            assert torch.allclose(synthesised[name], history[step - 1][1][name], atol=1e-8), (step, name)
        assert posthoc.reconstruction_error(tmp_path, 0.10, step=step) < 1e-6
        assert int(synthesised["count"]) == step


def test_error_grows_outside_the_tracked_range_and_max_error_refuses(tmp_path: Path) -> None:
    _, history = karras_trajectory(200, [gamma_of(s) for s in SIGMAS])
    write_run(tmp_path, history, 20, SIGMAS)
    inside = posthoc.reconstruction_error(tmp_path, 0.07)
    outside = [posthoc.reconstruction_error(tmp_path, s) for s in (0.03, 0.02, 0.01)]
    assert inside < outside[0] < outside[1] < outside[2]
    with pytest.raises(ValueError, match=r"`sigma_rel` must be one the snapshots can reconstruct.*got 0.01"):
        posthoc.synthesize(tmp_path, 0.01)
    assert posthoc.synthesize(tmp_path, 0.01, max_error=None)["a"].shape == (3, 4)


def test_bad_requests_are_refused_with_the_argument_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        posthoc.synthesize(tmp_path / "missing", 0.07)
    with pytest.raises(ValueError, match="`dirpath` must hold post-hoc EMA snapshots"):
        posthoc.synthesize(tmp_path, 0.07)
    _, history = karras_trajectory(40, [gamma_of(s) for s in SIGMAS])
    write_run(tmp_path, history, 10, SIGMAS)
    with pytest.raises(ValueError, match=r"`sigma_rel` must be a float in \(0, sqrt\(1/12\)\].*got 0.5"):
        posthoc.synthesize(tmp_path, 0.5)
    with pytest.raises(ValueError, match=r"`step` must be the step of a snapshot.*got 25. Nearest: \[20, 30"):
        posthoc.synthesize(tmp_path, 0.07, step=25)
    with pytest.raises(ValueError, match="`max_error` must be None or a number >= 0"):
        posthoc.synthesize(tmp_path, 0.07, max_error=-1.0)


def test_snapshots_of_different_models_are_refused(tmp_path: Path) -> None:
    _, history = karras_trajectory(20, [gamma_of(s) for s in SIGMAS])
    write_run(tmp_path, history, 10, SIGMAS)
    header, emas = posthoc.read_snapshot(tmp_path / "step-0000000020.pt")
    for ema in emas:
        ema["extra"] = torch.zeros(2)
    posthoc.write_snapshot(
        tmp_path / "step-0000000020.pt", step=20, sigma_rels=SIGMAS, gammas=header["gammas"], emas=emas
    )
    with pytest.raises(ValueError, match=r"hold different tensors or shapes \(\['extra'\]\)"):
        posthoc.synthesize(tmp_path, 0.07)


def test_torch_files_load_with_weights_only_and_hold_the_documented_layout(tmp_path: Path) -> None:
    _, history = karras_trajectory(10, [gamma_of(s) for s in SIGMAS])
    write_run(tmp_path, history, 10, SIGMAS)
    state = torch.load(tmp_path / "step-0000000010.pt", weights_only=True)
    assert state["format"] == "lightning-ema-posthoc" and state["version"] == 1 and state["step"] == 10
    assert state["sigma_rels"] == [0.05, 0.1]
    assert state["gammas"] == pytest.approx([gamma_of(0.05), gamma_of(0.1)], rel=1e-9)
    assert state["rank"] is None and state["world_size"] is None and state["shards"] == {}
    assert torch.equal(state["emas"][1]["a"], history[9][1]["a"].float())


def test_safetensors_files_hold_index_slash_name_and_json_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    _, history = karras_trajectory(10, [gamma_of(s) for s in SIGMAS])
    write_run(tmp_path, history, 10, SIGMAS, "safetensors")
    with safe_open(str(tmp_path / "step-0000000010.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["0/a", "0/b", "0/count", "1/a", "1/b", "1/count"]
        assert handle.metadata()["format"] == "lightning-ema-posthoc"
        assert torch.equal(handle.get_tensor("1/a"), history[9][1]["a"].float())


def test_a_failed_write_leaves_neither_a_file_nor_a_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(obj: object, f: object) -> None:
        Path(str(f)).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        posthoc.write_snapshot(tmp_path / "step-0000000001.pt", step=1, sigma_rels=[0.1], gammas=[6.9], emas=[{}])
    assert list(tmp_path.iterdir()) == []


def test_an_existing_snapshot_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "step-0000000001.pt"
    for value in (1.0, 2.0):
        posthoc.write_snapshot(path, step=1, sigma_rels=[0.1], gammas=[6.9], emas=[{"w": torch.full((3,), value)}])
    assert torch.equal(posthoc.read_snapshot(path)[1][0]["w"], torch.full((3,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000000001.pt"]


def split_rows(tensor: torch.Tensor, ranks: int) -> list[tuple[torch.Tensor, list[int]]]:
    """Rows split as torch.chunk does, with each part's offset (empty parts at the end)."""
    chunk = -(-tensor.shape[0] // ranks)
    return [(tensor[r * chunk : (r + 1) * chunk], [min(r * chunk, tensor.shape[0]), 0]) for r in range(ranks)]


def write_sharded_run(folder: Path, history, every: int, ranks: int) -> None:  # type: ignore[no-untyped-def]
    for step in range(every, len(history) + 1, every):
        emas = [{n: t.float() for n, t in ema.items()} for ema in history[step - 1][:2]]
        for rank in range(ranks):
            parts = [split_rows(ema["a"], ranks)[rank] for ema in emas]
            rank_emas = [{"a": part.clone()} for part, _ in parts]
            if rank == 0:  # unsharded tensors: rank 0's file
                for rank_ema, ema in zip(rank_emas, emas, strict=True):
                    rank_ema["b"] = ema["b"]
            name = posthoc.snapshot_filename(step, rank=rank, world_size=ranks)
            posthoc.write_snapshot(
                folder / name,
                step=step,
                sigma_rels=SIGMAS,
                gammas=[gamma_of(s) for s in SIGMAS],
                emas=rank_emas,
                shards={"a": {"shape": [3, 4], "offset": parts[0][1]}},
                rank=rank,
                world_size=ranks,
            )


def test_shards_of_several_ranks_are_put_together(tmp_path: Path) -> None:
    _, history = karras_trajectory(60, [gamma_of(s) for s in SIGMAS])
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    whole.mkdir()
    sharded.mkdir()
    write_run(whole, history, 10, SIGMAS)
    write_sharded_run(sharded, history, 10, ranks=4)  # 3 rows over 4 ranks: the last shard is empty
    assert (sharded / "step-0000000060.rank3-of-4.pt").is_file()
    expected = posthoc.synthesize(whole, 0.07)
    actual = posthoc.synthesize(sharded, 0.07)
    for name in ("a", "b"):
        assert torch.allclose(actual[name], expected[name], atol=1e-6), name


def test_an_incomplete_sharded_snapshot_is_left_out_with_a_warning(tmp_path: Path) -> None:
    _, history = karras_trajectory(30, [gamma_of(s) for s in SIGMAS])
    write_sharded_run(tmp_path, history, 10, ranks=2)
    (tmp_path / "step-0000000030.rank1-of-2.pt").unlink()  # the run stopped between the ranks' writes
    with pytest.warns(UserWarning, match=r"step 30 .* lacks the files of ranks \[1\]"):
        snapshots = posthoc.list_snapshots(tmp_path)
    assert [s.step for s in snapshots] == [10, 20]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert posthoc.synthesis_plan(tmp_path, 0.07).step == 20


def test_missing_shard_data_is_an_error(tmp_path: Path) -> None:
    _, history = karras_trajectory(10, [gamma_of(s) for s in SIGMAS])
    write_sharded_run(tmp_path, history, 10, ranks=2)
    path = tmp_path / "step-0000000010.rank1-of-2.pt"
    header, emas = posthoc.read_snapshot(path)
    posthoc.write_snapshot(
        path, step=10, sigma_rels=SIGMAS, gammas=header["gammas"], emas=[{} for _ in emas], rank=1, world_size=2
    )
    with pytest.raises(ValueError, match=r"does not cover the whole of \['a'\]"):
        posthoc.synthesize(tmp_path, 0.07)


def test_superseded_snapshots_are_not_read(tmp_path: Path) -> None:
    _, history = karras_trajectory(30, [gamma_of(s) for s in SIGMAS])
    write_run(tmp_path, history, 10, SIGMAS)
    (tmp_path / posthoc.SUPERSEDED).mkdir()
    (tmp_path / "step-0000000030.pt").rename(tmp_path / posthoc.SUPERSEDED / "step-0000000030.pt")
    assert [s.step for s in posthoc.list_snapshots(tmp_path)] == [10, 20]


def test_save_state_dict_writes_both_formats_atomically(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tied = torch.arange(6.0)
    weights = {"w": tied, "tied": tied, "n": torch.tensor(3)}
    posthoc.save_state_dict(weights, tmp_path / "out.safetensors")
    posthoc.save_state_dict(weights, tmp_path / "out.pt")
    for loaded in (load_file(str(tmp_path / "out.safetensors")), torch.load(tmp_path / "out.pt", weights_only=True)):
        assert set(loaded) == {"w", "tied", "n"} and torch.equal(loaded["tied"], tied)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "out.safetensors"]

"""Untrusted checkpoint files through every entry point: no code execution, no data loss, atomic export (issue 13).

Checkpoints come from a real ``Trainer.fit``; bad inputs are made from them by editing the loaded dict (or the
bytes) and saving again. Entry points: ``load_ema_state_dict``, ``python -m lightning_ema list`` and ``export``
(to ``.pt`` and ``.safetensors``; in-process through ``main`` where the exit code and stderr are what matter, in
real subprocesses where the process itself is the point) and ``trainer.fit(ckpt_path=...)``. Payloads are pickles
whose ``__reduce__`` would create a marker file; every payload test first proves that plain unpickling runs it.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import TinyClassifier, load, make_loader, snapshot, trainer_kwargs
from torch import Tensor

from lightning_ema import EMACallback, EMAStateError, load_ema_state_dict
from lightning_ema.__main__ import main

DECAY = 0.9
KEY = EMACallback(decay=DECAY).state_key


class Payload:
    """Unpickling runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def assert_live(payload: object, marker: Path) -> None:
    """Plain unpickling of ``payload`` creates the marker (so the test can fail); the marker is removed again."""
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint file written by a real Trainer with an EMACallback."""
    path = tmp_path_factory.mktemp("trained") / "last.ckpt"
    trainer = L.Trainer(callbacks=[EMACallback(decay=DECAY)], max_epochs=1, **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader())
    trainer.save_checkpoint(path)
    return path


def as_folder(checkpoint: dict[str, Any], folder: Path) -> Path:
    """Write ``checkpoint`` in the layout of ModelParallelStrategy: the state_dict through DCP, the rest in meta.pt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save({"state_dict": checkpoint["state_dict"]}, checkpoint_id=folder)
    torch.save({key: value for key, value in checkpoint.items() if key != "state_dict"}, folder / "meta.pt")
    return folder


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def fit_from(path: Path) -> tuple[EMACallback, TinyClassifier]:
    callback, model = EMACallback(decay=DECAY), TinyClassifier()
    trainer = L.Trainer(callbacks=[callback], max_epochs=3, **trainer_kwargs())
    trainer.fit(model, make_loader(), ckpt_path=path)
    return callback, model


# ---------------------------------------------------------------------------------------------- 1. code execution
def payload_folder(trained: Path, folder: Path, marker: Path, where: str) -> Path:
    checkpoint = load(trained)
    as_folder(checkpoint, folder)
    if where == ".metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    elif where == "inside .metadata":
        with open(folder / ".metadata", "rb") as stream:
            metadata = pickle.load(stream)  # written by this test
        metadata.planner_data = [Payload(marker)]
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    elif where == "meta.pt":
        checkpoint["callbacks"]["evil"] = Payload(marker)
        torch.save({k: v for k, v in checkpoint.items() if k != "state_dict"}, folder / "meta.pt")
    elif where == "tensor file":
        # one entry of a valid index points at a file holding a pickled object instead of a tensor
        torch.save(Payload(marker), folder / "evil.distcp")
        with open(folder / ".metadata", "rb") as stream:
            metadata = pickle.load(stream)  # written by this test
        index = next(i for i in metadata.storage_data if i.fqn == "state_dict.net.0.weight")
        info = metadata.storage_data[index]
        info.relative_path, info.offset, info.length = "evil.distcp", 0, (folder / "evil.distcp").stat().st_size
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


FOLDER_PAYLOADS = [".metadata", "inside .metadata", "meta.pt", "tensor file"]


@pytest.mark.parametrize("where", FOLDER_PAYLOADS)
@pytest.mark.parametrize("entry", ["load_ema_state_dict", "list", "export", "fit"])
def test_no_folder_payload_runs_code(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, entry: str
) -> None:
    marker = tmp_path / "pwned"
    assert_live(Payload(marker), marker)
    folder = payload_folder(trained, tmp_path / "checkpoint", marker, where)
    if entry == "load_ema_state_dict":
        with pytest.raises(ValueError):
            load_ema_state_dict(folder)
    elif entry == "list":
        assert main(["list", str(folder)]) == 2
        one_error_line(capsys)
    elif entry == "export":
        assert main(["export", str(folder), str(tmp_path / "ema.pt")]) == 2
        one_error_line(capsys)
        assert not (tmp_path / "ema.pt").exists()
    else:  # Lightning's own loader; a folder only loads under ModelParallelStrategy (see README "Untrusted files")
        with pytest.raises(Exception):  # noqa: B017 - whatever Lightning raises, the point is the marker
            fit_from(folder)
    assert not marker.exists()


def test_a_folder_payload_message_says_why_and_how_to_opt_in(trained: Path, tmp_path: Path) -> None:
    folder = payload_folder(trained, tmp_path / "checkpoint", tmp_path / "pwned", ".metadata")
    with pytest.raises(ValueError) as info:
        load_ema_state_dict(folder)
    message = str(info.value)
    assert "the global builtins.exec" in message and "could run code" in message
    assert "weights_only=False" in message


def test_a_clean_folder_still_loads_to_the_same_weights(trained: Path, tmp_path: Path) -> None:
    folder = as_folder(load(trained), tmp_path / "checkpoint")
    expected = load_ema_state_dict(trained)
    got = load_ema_state_dict(folder)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def single_file_payload(trained: Path, path: Path, marker: Path, where: str) -> Path:
    checkpoint = load(trained)
    if where == "callbacks":
        checkpoint["callbacks"]["evil"] = Payload(marker)
    elif where == "EMA tensor":
        checkpoint["callbacks"][KEY]["emas"][0]["net.0.weight"] = Payload(marker)
    elif where == "hyper_parameters":
        checkpoint["hyper_parameters"]["lr"] = Payload(marker)
    legacy = where == "legacy format"
    if legacy:
        checkpoint["callbacks"]["evil"] = Payload(marker)
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("where", ["callbacks", "EMA tensor", "hyper_parameters", "legacy format"])
@pytest.mark.parametrize("entry", ["load_ema_state_dict", "list", "export", "fit"])
def test_no_single_file_payload_runs_code(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, entry: str
) -> None:
    marker = tmp_path / "pwned"
    path = single_file_payload(trained, tmp_path / "evil.ckpt", marker, where)
    if entry == "load_ema_state_dict":
        with pytest.raises(ValueError, match="refused an object in the file for safety"):
            load_ema_state_dict(path)
    elif entry in ("list", "export"):
        args = ["list", str(path)] if entry == "list" else ["export", str(path), str(tmp_path / "ema.pt")]
        assert main(args) == 2
        assert "refused an object in the file for safety" in one_error_line(capsys)
    else:
        with pytest.raises(Exception, match="Weights only load failed"):
            fit_from(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- 2. data loss
@pytest.mark.parametrize("alias", ["same", "./x", "symbolic link", "hard link", "inside the folder"])
def test_export_refuses_to_overwrite_the_checkpoint(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, alias: str
) -> None:
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "last.ckpt"
    source.write_bytes(trained.read_bytes())
    if alias == "inside the folder":
        source = as_folder(load(trained), tmp_path / "folder")
        output = source / "meta.pt"
    elif alias == "symbolic link":
        output = tmp_path / "link.ckpt"
        output.symlink_to(source)
    elif alias == "hard link":
        output = tmp_path / "hard.ckpt"
        os.link(source, output)
    else:
        output = Path("./last.ckpt") if alias == "./x" else source
    protected = source / "meta.pt" if source.is_dir() else source
    before = protected.read_bytes()
    assert main(["export", str(source), str(output)]) == 2
    assert "must not be" in one_error_line(capsys)
    assert protected.read_bytes() == before
    load_ema_state_dict(source)  # still a working checkpoint


# ---------------------------------------------------------------------------------------------- 3. atomic export
FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    from lightning_ema.__main__ import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_failed_export_leaves_the_earlier_export_and_says_so_in_one_line(trained: Path, tmp_path: Path) -> None:
    # torch.save over an earlier export, and safetensors to a new file: both writers, both starting points
    earlier = tmp_path / "ema.pt"
    earlier.write_bytes(b"an earlier export")
    fresh = tmp_path / "fresh.safetensors"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    processes = [  # concurrently: each process spends seconds importing torch and lightning
        subprocess.Popen(
            [sys.executable, "-c", FULL_DISK, "export", str(trained), str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for target in (earlier, fresh)
    ]
    for process, target in zip(processes, (earlier, fresh), strict=True):
        _, stderr = process.communicate(timeout=240)
        assert f"Writing {str(target)!r} failed" in stderr
        assert process.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert "failed" in lines[0] and "left as it was" in lines[0], lines[0]
    assert earlier.read_bytes() == b"an earlier export"
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.pt"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------- 4. malformed states
def ema_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint["callbacks"][KEY]


def set_in_ema(name: str, make: Callable[[Tensor], object]) -> Callable[[dict[str, Any]], None]:
    def change(checkpoint: dict[str, Any]) -> None:
        ema = ema_state(checkpoint)["emas"][0]
        ema[name] = make(ema[name])

    return change


BAD_STATES: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "missing version": (lambda c: ema_state(c).pop("version"), "has no `version`"),
    "future version": (lambda c: ema_state(c).__setitem__("version", 99), "Upgrade lightning-ema"),
    "string instead of a tensor": (set_in_ema("net.0.bias", lambda t: "0.1"), "'net.0.bias' is a str"),
    "meta tensor": (set_in_ema("net.0.bias", lambda t: torch.empty_like(t, device="meta")), "meta tensor"),
    "sparse tensor": (set_in_ema("net.0.weight", lambda t: t.to_sparse()), "torch.sparse_coo tensor"),
    "missing emas": (lambda c: ema_state(c).pop("emas"), "lacks its EMA tensors (`emas`)"),
    "a list where a dict belongs": (
        lambda c: ema_state(c)["emas"].__setitem__(0, list(ema_state(c)["emas"][0].values())),
        "EMA 0 (ConstantDecay(decay=0.9)) must be a dict of tensors by name, got a list",
    ),
    "emas given as a dict": (
        lambda c: ema_state(c).__setitem__("emas", {"0": ema_state(c)["emas"][0]}),
        "`emas` must be a list",
    ),
    "more decays than EMAs": (
        lambda c: ema_state(c)["config"]["decays"].append("ConstantDecay(decay=0.99)"),
        "holds 1 EMAs but describes 2 decays",
    ),
    "NaN": (set_in_ema("net.0.weight", lambda t: t.index_fill(0, torch.tensor([2]), float("nan"))), "NaN"),
    "infinity": (set_in_ema("net.3.bias", lambda t: t.fill_(float("inf"))), "'net.3.bias' holds 3 NaN or infinite"),
    "int64 EMA of a float weight": (
        set_in_ema("net.0.weight", lambda t: t.long()),
        "'net.0.weight' is torch.int64 but its weight is torch.float32",
    ),
    "EMA shape differs from the weight": (
        set_in_ema("net.3.weight", lambda t: t.t().contiguous()),
        "'net.3.weight' has shape (16, 3) but its weight (3, 16)",
    ),
    "callbacks as a list": (
        lambda c: c.__setitem__("callbacks", [ema_state(c)]),
        "checkpoint['callbacks'] must be a dict",
    ),
    "state_dict as a list": (lambda c: c.__setitem__("state_dict", [1]), "checkpoint['state_dict'] must be a dict"),
}


def bad_checkpoint(trained: Path, path: Path, case: str) -> Path:
    checkpoint = load(trained)
    BAD_STATES[case][0](checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_every_malformed_state_is_one_error_through_every_reader(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path = bad_checkpoint(trained, tmp_path / "bad.ckpt", case)
    words = BAD_STATES[case][1]
    with pytest.raises(EMAStateError) as info:
        load_ema_state_dict(path)
    assert words in str(info.value)
    for args in (
        ["list", str(path)],
        *(["export", str(path), str(tmp_path / f"ema{s}")] for s in (".pt", ".safetensors")),
    ):
        assert main(args) == 2, args
        assert words in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]  # nothing was written


RESUME_REFUSES = {
    "NaN": "NaN",
    "infinity": "holds 3 NaN or infinite",
    "meta tensor": "meta tensor",
    "sparse tensor": "torch.sparse_coo tensor",
    "string instead of a tensor": "'net.0.bias' is a str",
    "int64 EMA of a float weight": "dtype cannot hold the weight: ['net.0.weight: EMA torch.int64 vs model "
    "torch.float32']",
    "missing version": "has no `version`",
    "a list where a dict belongs": "must be a dict of tensors by name",
}


@pytest.mark.parametrize("case", list(RESUME_REFUSES))
def test_resume_refuses_a_malformed_ema_and_takes_nothing_of_it(trained: Path, tmp_path: Path, case: str) -> None:
    path = bad_checkpoint(trained, tmp_path / "bad.ckpt", case)
    callback, model = EMACallback(decay=DECAY), TinyClassifier()
    trainer = L.Trainer(callbacks=[callback], max_epochs=3, **trainer_kwargs())
    with pytest.raises(EMAStateError) as info:
        trainer.fit(model, make_loader(), ckpt_path=path)
    assert RESUME_REFUSES[case] in str(info.value)
    assert KEY in str(info.value)
    # what README says: no part of the EMA is taken, but Lightning had restored the model's weights already
    assert callback.num_updates == 0
    with pytest.raises(RuntimeError, match="not been created"):
        callback.ema_state_dict()
    raw = load(path)["state_dict"]
    for name, tensor in snapshot(model).items():
        assert torch.equal(tensor, raw[name]), name


# ---------------------------------------------------------------------------------------------- 5. load errors
FILES: dict[str, tuple[Callable[[Path, bytes], bytes], str]] = {
    "empty": (lambda path, data: b"", "is empty (0 bytes), not a checkpoint"),
    "truncated": (lambda path, data: data[: len(data) // 2], "damaged or truncated torch archive"),
    "random": (lambda path, data: b"\x07" + os.urandom(3000), "is not a checkpoint"),
}


@pytest.mark.parametrize("case", list(FILES))
@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe-load"])
def test_load_errors_say_what_the_file_is(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, unsafe: bool
) -> None:
    path = tmp_path / "file.ckpt"
    path.write_bytes(FILES[case][0](path, trained.read_bytes()))
    with pytest.raises(ValueError) as info:
        load_ema_state_dict(path, weights_only=not unsafe)
    assert FILES[case][1] in str(info.value)
    assert "weights_only" not in str(info.value)  # nothing an unsafe load could fix
    extra = ["--unsafe-load"] if unsafe else []
    for args in (["list", str(path), *extra], ["export", str(path), str(tmp_path / "ema.pt"), *extra]):
        assert main(args) == 2
        assert FILES[case][1] in one_error_line(capsys)


def test_unsafe_load_of_an_empty_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    run = subprocess.run(
        [sys.executable, "-m", "lightning_ema", "export", "--unsafe-load", str(empty), str(tmp_path / "ema.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {str(empty)!r} is empty (0 bytes), not a checkpoint: an "
                                              "interrupted save or copy leaves such files."]  # fmt: skip
    assert not (tmp_path / "ema.pt").exists()


# ---------------------------------------------------------------------------------------------- foreign layouts
@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda t: t.index_fill(0, torch.tensor([0]), float("nan")),
            "holds 4 NaN or infinite values (of 64)",
        ),  # row 0 of a 16x4 weight
        (lambda t: torch.empty_like(t, device="meta"), "is a meta tensor"),
        (lambda t: t.to_sparse(), "torch.sparse_coo tensor"),
    ],
    ids=["NaN", "meta", "sparse"],
)
def test_another_librarys_ema_passes_the_same_validation(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Tensor], Tensor], words: str
) -> None:
    weights = load_ema_state_dict(trained)
    ema = {**weights, "net.0.weight": make(weights["net.0.weight"].clone())}
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": weights, "state_dict_ema": ema}, path)  # timm's training checkpoint layout
    with pytest.raises(EMAStateError) as info:
        load_ema_state_dict(path)
    assert "The timm EMA of" in str(info.value) and "'net.0.weight'" in str(info.value) and words in str(info.value)
    assert main(["export", str(path), str(tmp_path / "ema.pt")]) == 2
    assert words in one_error_line(capsys)

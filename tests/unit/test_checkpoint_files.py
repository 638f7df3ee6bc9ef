"""Reading untrusted checkpoint files and folders, and writing exports (issue 13, cases 1, 2, 3, 5); no Trainer.

Payloads are real pickles whose ``__reduce__`` would create a marker file; each test first shows that a plain
``pickle.loads`` of the payload does create it (so the test can fail), then that our readers never do.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_ema._dcp import read_metadata
from lightning_ema._files import load_file, refuse_same_file, write_atomically
from lightning_ema.checkpoint import load_checkpoint


class Payload:
    """Unpickling runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class Settings:
    """A user class in a checkpoint's hyper-parameters: harmless, but not something weights_only allows."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and other.lr == self.lr


class TouchThroughPathlib:
    """Unpickling calls ``pathlib.Path.touch``: a function of a module whose classes ``.metadata`` may use."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class SaveThroughTorch:
    """Unpickling calls ``torch.save`` (a torch function, like the allowed ``torch.Size``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (torch.save, ({}, str(self.marker)))


def assert_live(payload: bytes, marker: Path) -> None:
    """The payload really runs code when unpickled plainly; then the marker is removed again."""
    pickle.loads(payload)
    assert marker.exists(), "the payload did not run: the test would prove nothing"
    marker.unlink()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A torch.distributed.checkpoint folder of two tensors, written in one process."""
    path = tmp_path / "checkpoint"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save({"state_dict": {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(7)}}, checkpoint_id=path)
    torch.save({"epoch": 0}, path / "meta.pt")  # the rest of a Lightning checkpoint, as ModelParallelStrategy saves it
    return path


def metadata_of(folder: Path) -> object:
    with open(folder / ".metadata", "rb") as stream:
        return pickle.load(stream)  # the folder was written by this test


def write_metadata(folder: Path, data: bytes) -> None:
    (folder / ".metadata").write_bytes(data)


def test_a_real_folder_index_is_read_and_checked(folder: Path) -> None:
    metadata = read_metadata(folder)
    assert set(metadata.state_dict_metadata) == {"state_dict.w", "state_dict.n"}
    assert tuple(metadata.state_dict_metadata["state_dict.w"].size) == (2, 3)
    assert metadata.state_dict_metadata["state_dict.n"].properties.dtype == torch.int64


PAYLOADS = {
    "exec": lambda marker, folder: pickle.dumps(Payload(marker)),
    "pathlib.Path.touch": lambda marker, folder: pickle.dumps(TouchThroughPathlib(marker), protocol=4),
    "torch.save": lambda marker, folder: pickle.dumps(SaveThroughTorch(marker)),
}


@pytest.mark.parametrize("kind", [*PAYLOADS, "inside a valid index"])
def test_a_crafted_folder_index_never_runs_code(folder: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    if kind == "inside a valid index":
        metadata = metadata_of(folder)
        metadata.planner_data = {"x": Payload(marker)}  # type: ignore[attr-defined]
        payload = pickle.dumps(metadata)
    else:
        payload = PAYLOADS[kind](marker, folder)
    assert_live(payload, marker)
    write_metadata(folder, payload)
    with pytest.raises(ValueError) as info:
        read_metadata(folder)
    assert "it was not loaded, since unpickling it could run code" in str(info.value)
    assert "weights_only=False" in str(info.value)
    with pytest.raises(ValueError):
        load_checkpoint(folder)
    assert not marker.exists()


def test_a_real_folder_loads_in_one_process(folder: Path) -> None:
    checkpoint = load_checkpoint(folder)
    assert checkpoint["epoch"] == 0
    assert torch.equal(checkpoint["state_dict"]["w"], torch.arange(6.0).view(2, 3))
    assert torch.equal(checkpoint["state_dict"]["n"], torch.tensor(7))


def test_an_index_claiming_more_tensor_bytes_than_the_files_hold_is_refused(folder: Path) -> None:
    metadata = metadata_of(folder)
    metadata.state_dict_metadata["state_dict.w"].size = torch.Size([10**6, 10**6])  # type: ignore[attr-defined]
    write_metadata(folder, pickle.dumps(metadata))
    with pytest.raises(
        ValueError, match=r"describes 4000000000\d+ bytes of tensors, but the folder's tensor files hold"
    ):
        load_checkpoint(folder)


def test_a_persistent_id_in_the_index_is_refused(folder: Path) -> None:
    class WithPersistentId(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return "storage" if isinstance(obj, Counter) else None

    buffer = io.BytesIO()
    WithPersistentId(buffer).dump({"a": Counter()})
    write_metadata(folder, buffer.getvalue())
    with pytest.raises(ValueError, match="persistent id"):
        read_metadata(folder)


def test_a_folder_index_with_an_unknown_class_loads_only_when_the_user_opts_in(folder: Path) -> None:
    metadata = metadata_of(folder)
    metadata.planner_data = Counter(a=1)  # type: ignore[attr-defined]  # harmless, but not torch's
    write_metadata(folder, pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"collections\.Counter.*weights_only=False"):
        read_metadata(folder)
    assert read_metadata(folder, weights_only=False).planner_data == Counter(a=1)


def test_an_index_pointing_outside_the_folder_is_refused(folder: Path) -> None:
    metadata = metadata_of(folder)
    for info in metadata.storage_data.values():  # type: ignore[attr-defined]
        info.relative_path = "../outside.distcp"
    write_metadata(folder, pickle.dumps(metadata))
    with pytest.raises(ValueError, match=re.escape("'../outside.distcp', which is not a file of the folder")):
        read_metadata(folder)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "truncated or empty"),
        (None, "truncated or empty"),  # the first half of a real index
        (pickle.dumps({"state_dict": 1}), "holds a dict, not a Metadata"),
        (b"not a pickle at all", "not a readable distributed checkpoint index"),
    ],
    ids=["empty", "truncated", "a dict", "text"],
)
def test_a_broken_folder_index_says_what_it_is(folder: Path, content: bytes | None, words: str) -> None:
    if content is None:
        content = (folder / ".metadata").read_bytes()[:200]
    write_metadata(folder, content)
    with pytest.raises(ValueError, match=words):
        read_metadata(folder)


def test_a_folder_without_index_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("folder without .metadata: not a distributed checkpoint")):
        read_metadata(tmp_path)


# ---------------------------------------------------------------------------------------------- single files
def save(path: Path, obj: object, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("weights_only", [True, False])
def test_an_empty_file_says_it_is_empty(tmp_path: Path, weights_only: bool) -> None:
    (tmp_path / "empty.ckpt").touch()
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\), not a checkpoint") as info:
        load_file(tmp_path / "empty.ckpt", weights_only=weights_only)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_checkpoint_says_it_is_truncated(tmp_path: Path, legacy: bool) -> None:
    options = {"_use_new_zipfile_serialization": False} if legacy else {}
    data = save(tmp_path / "whole.ckpt", {"state_dict": {"w": torch.randn(1000)}}, **options).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as info:
        load_file(tmp_path / "cut.ckpt", weights_only=True)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"hello, this is a text file\n", b"\x00" * 64, b"config: 1\nname: x\n"],
    ids=["random", "text", "zeros", "yaml-starting-with-c"],
)
def test_a_file_that_is_not_a_checkpoint_says_so_without_suggesting_unsafe_loading(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "file.ckpt"
    path.write_bytes(b"\x19" + content)  # never the first byte of a zip or of a pickle
    with pytest.raises(ValueError, match="is not a checkpoint: it is neither a torch archive") as info:
        load_file(path, weights_only=True)
    assert "weights_only" not in str(info.value)


def test_a_safetensors_file_is_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "ema.safetensors"))
    with pytest.raises(ValueError, match="is a safetensors file: plain weights"):
        load_file(tmp_path / "ema.safetensors", weights_only=True)


def test_only_an_object_refused_for_safety_suggests_weights_only_false(tmp_path: Path) -> None:
    path = save(tmp_path / "settings.ckpt", {"hyper_parameters": Settings(0.1)})
    with pytest.raises(ValueError) as info:
        load_file(path, weights_only=True)
    message = str(info.value)
    assert "refused an object in the file for safety" in message and "Settings" in message
    assert "pass weights_only=False (on the command line: --unsafe-load)" in message
    assert load_file(path, weights_only=False) == {"hyper_parameters": Settings(0.1)}


def test_a_file_that_would_run_system_code_is_refused_without_the_way_out(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class System:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    path = save(tmp_path / "evil.ckpt", {"callbacks": {"x": System()}})
    with pytest.raises(ValueError) as info:
        load_file(path, weights_only=True)
    assert "tries to run code" in str(info.value)
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        load_file(tmp_path / "nothing.ckpt", weights_only=True)


def test_a_checkpoint_that_is_not_a_dict_says_so(tmp_path: Path) -> None:
    path = save(tmp_path / "list.ckpt", [torch.ones(1)])
    with pytest.raises(ValueError, match="not a Lightning checkpoint: it holds a list"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------- export targets
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"the checkpoint")
    return path


@pytest.mark.parametrize("alias", ["same path", "./x", "a/../x", "symbolic link", "hard link"])
def test_the_checkpoint_itself_is_refused_as_output(
    checkpoint: Path, tmp_path: Path, alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    outputs = {
        "same path": checkpoint,
        "./x": Path("./last.ckpt"),
        "a/../x": Path("sub/../last.ckpt"),
        "symbolic link": tmp_path / "link.ckpt",
        "hard link": tmp_path / "hard.ckpt",
    }
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.ckpt").symlink_to(checkpoint)
    os.link(checkpoint, tmp_path / "hard.ckpt")
    with pytest.raises(ValueError, match="must not be the checkpoint being read"):
        refuse_same_file(checkpoint, outputs[alias])
    assert checkpoint.read_bytes() == b"the checkpoint"


def test_a_file_inside_a_checkpoint_folder_or_a_folder_is_refused_as_output(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be inside the checkpoint folder"):
        refuse_same_file(folder, folder / "ema.pt")
    with pytest.raises(ValueError, match="must be a file to write, got the folder"):
        refuse_same_file(tmp_path / "a.ckpt", folder)
    refuse_same_file(folder, tmp_path / "ema.pt")  # next to it is fine


def test_write_atomically_replaces_only_when_complete(tmp_path: Path) -> None:
    output = tmp_path / "ema.pt"
    output.write_bytes(b"earlier export")

    def fails(path: str) -> None:
        Path(path).write_bytes(b"half of it")
        raise RuntimeError("file write failed")

    with pytest.raises(OSError, match=r"Writing .* failed: file write failed; the file there, if any, was left as"):
        write_atomically(output, fails)
    assert output.read_bytes() == b"earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.pt"]  # no temporary file left

    write_atomically(output, lambda path: Path(path).write_bytes(b"new export"))
    assert output.read_bytes() == b"new export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.pt"]


def test_write_atomically_gives_ordinary_permissions_and_keeps_symbolic_links(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")  # what an ordinary open() gives under this umask
    target, link = tmp_path / "real.pt", tmp_path / "link.pt"
    link.symlink_to(target)
    write_atomically(link, lambda path: Path(path).write_bytes(b"exported"))
    assert link.is_symlink() and target.read_bytes() == b"exported"
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)

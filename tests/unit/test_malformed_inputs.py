"""Damaged and hostile weight files: one readable error naming the file, nothing executed, and never torch's advice
to load with ``weights_only=False``. Through ``m2d2 convert``, :meth:`M2D2.from_pretrained` and training resume."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from m2d2.cli import main
from m2d2.convert import CheckpointFormatError, UnsafeCheckpointError
from m2d2.models import M2D2
from m2d2.models.model import WEIGHTS_FILE
from m2d2.train.checkpoint import CheckpointManager
from tests.helpers import tiny_config

UNSAFE_ADVICE = "weights_only"

# torch notes that it did not write a protocol-5 pickle before refusing it; the refusal is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


def _touch(path: str) -> None:
    Path(path).write_text("executed")


class Payload:
    """Unpickling this object calls ``_touch``: what loading the file unsafely would execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _weights() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(4)}


def _with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# safetensors payloads: name -> bytes
def truncated() -> bytes:
    blob = save(_weights())
    return blob[: len(blob) - 7]


def random_bytes() -> bytes:
    return os.urandom(4096)


def huge_header_length() -> bytes:
    return struct.pack("<Q", 2**62) + b"{}"  # a header "longer than" any file


def huge_tensor() -> bytes:
    # A well-formed header whose one tensor claims 4 TiB: the file holds 16 bytes.
    return _with_header({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}},
                        b"\0" * 16)


def empty() -> bytes:
    return b""


SAFETENSORS_DAMAGE: dict[str, Callable[[], bytes]] = {f.__name__: f for f in (
    truncated, random_bytes, huge_header_length, huge_tensor, empty)}  # fmt: skip

# Why each payload is refused, as the message words it.
REASONS = {
    "truncated": "incomplete metadata, file not fully covered",
    "random_bytes": "header too large",
    "huge_header_length": "header too large",
    "huge_tensor": "incomplete metadata, file not fully covered",
    "empty": "header too small",
}


def _malicious_pickles(marker: Path) -> dict[str, bytes]:
    """The same payload as a zip checkpoint (``torch.save``), the legacy format and plain pickles."""
    obj = {"model": _weights(), "extra": Payload(marker)}
    out = {}
    for name, kwargs in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
        path = marker.parent / f"{name}.tmp"
        torch.save(obj, path, **kwargs)
        out[f"torch-{name}"] = path.read_bytes()
        path.unlink()
    for protocol in (2, 5):
        out[f"pickle-{protocol}"] = pickle.dumps(obj, protocol=protocol)
    return out


def _convert(capsys: pytest.CaptureFixture, src: Path, out: Path) -> tuple[int, str]:
    code = main(["convert", str(src), str(out)])
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing half-done is reported
    assert not out.exists()
    return code, captured.err


def _assert_one_line(err: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and UNSAFE_ADVICE not in err, err


# ----------------------------------------------------------------------------- m2d2 convert
@pytest.mark.parametrize("damage", sorted(SAFETENSORS_DAMAGE))
def test_convert_reports_a_damaged_safetensors_file(tmp_path, capsys, damage):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(SAFETENSORS_DAMAGE[damage]())
    code, err = _convert(capsys, path, tmp_path / "out")
    assert code == 1
    _assert_one_line(err)
    assert err == f"m2d2 convert: error: {path}: not a valid safetensors file ({REASONS[damage]})\n"


@pytest.mark.parametrize("damage", ["truncated-zip", "truncated-legacy", "random", "empty", "text"])
def test_convert_reports_a_damaged_torch_file(tmp_path, capsys, damage):
    blob = {"truncated-zip": lambda: _torch_bytes()[:300], "truncated-legacy": lambda: _torch_bytes(legacy=True)[:-9],
            "random": lambda: os.urandom(4096), "empty": lambda: b"", "text": lambda: b"not a checkpoint\n"}[damage]()
    path = tmp_path / "ckpt.pth"
    path.write_bytes(blob)
    code, err = _convert(capsys, path, tmp_path / "out")
    assert code == 1
    _assert_one_line(err)
    assert err.startswith(f"m2d2 convert: error: {path}: not a valid PyTorch checkpoint ("), err


def _torch_bytes(legacy: bool = False) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(_weights(), buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def test_convert_refuses_pickled_code_without_running_it(tmp_path, capsys):
    marker = tmp_path / "executed"
    for kind, blob in _malicious_pickles(marker).items():
        path = tmp_path / f"{kind}.pth"
        path.write_bytes(blob)
        code, err = _convert(capsys, path, tmp_path / f"out-{kind}")
        assert code == 1, kind
        _assert_one_line(err)
        # The refusal names the file and the code it would have imported, and says it is refused.
        assert err.startswith(f"m2d2 convert: error: {path}: refusing to unpickle:"), (kind, err)
        assert re.search(r"\([^)]*\btest_malformed_inputs\._touch\b[^)]*\)", err), (kind, err)
        assert not marker.exists(), kind


def test_convert_of_a_pickle_named_safetensors_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "executed"
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(_malicious_pickles(marker)["torch-legacy"])
    code, err = _convert(capsys, path, tmp_path / "out")
    assert code == 1
    _assert_one_line(err)
    assert f"{path}: not a valid safetensors file (" in err
    assert not marker.exists()


# ----------------------------------------------------------------------------- exports and checkpoints
@pytest.fixture(scope="module")
def export_files(tmp_path_factory) -> dict[str, bytes]:
    """The files of a real (tiny) export, written once."""
    root = tmp_path_factory.mktemp("export")
    M2D2(tiny_config()).save_pretrained(str(root))
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def _export(root: Path, files: dict[str, bytes], weights: bytes) -> Path:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / WEIGHTS_FILE).write_bytes(weights)
    return root


@pytest.mark.parametrize("damage", [*sorted(SAFETENSORS_DAMAGE), "pickle"])
def test_from_pretrained_reports_damaged_weights(tmp_path, export_files, damage):
    marker = tmp_path / "executed"
    blob = _malicious_pickles(marker)["torch-zip"] if damage == "pickle" else SAFETENSORS_DAMAGE[damage]()
    root = _export(tmp_path / "export", export_files, blob)
    with pytest.raises(CheckpointFormatError) as caught:
        M2D2.from_pretrained(str(root))
    message = str(caught.value)
    assert message.startswith(f"{root / WEIGHTS_FILE}: not a valid safetensors file ("), message
    assert "\n" not in message
    assert not marker.exists()


def test_from_pretrained_still_loads_an_intact_export(tmp_path, export_files):
    root = _export(tmp_path / "export", export_files, export_files[WEIGHTS_FILE])
    assert isinstance(M2D2.from_pretrained(str(root)), M2D2)


def test_resume_reports_damaged_weights_and_refuses_pickled_code(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    step_dir = Path(manager.save(5, _weights(), {"rng": torch.get_rng_state()}, {"train_state": {}}))
    assert manager.load().step == 5

    intact = (step_dir / "model.safetensors").read_bytes()
    (step_dir / "model.safetensors").write_bytes(intact[:-3])
    from m2d2.train.checkpoint import CheckpointCorruptError

    with pytest.raises(CheckpointCorruptError, match="model.safetensors"):  # the commit marker's digest, first
        manager.load()
    # A checkpoint written before markers recorded digests: the readers' own checks still refuse bad bytes.
    marker_file = step_dir / "COMPLETE"
    marker_file.write_text(json.dumps({"world_size": 1}))
    with pytest.raises(CheckpointFormatError,
                       match=rf"^{re.escape(str(step_dir / 'model.safetensors'))}: not a valid safetensors file \("):
        manager.load()

    (step_dir / "model.safetensors").write_bytes(intact)
    marker = tmp_path / "executed"
    rank_file = step_dir / "rank-00000.pt"
    rank_file.write_bytes(_malicious_pickles(marker)["torch-zip"])
    with pytest.raises(UnsafeCheckpointError) as caught:
        manager.load()
    message = str(caught.value)
    assert message.startswith(f"{rank_file}: refusing to unpickle:") and "test_malformed_inputs._touch" in message
    assert UNSAFE_ADVICE not in message and caught.value.__cause__ is None
    with pytest.raises(UnsafeCheckpointError):
        manager.load_rank_state(5, 0)
    assert not marker.exists()

    rank_file.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointFormatError, match=rf"^{re.escape(str(rank_file))}: not a valid PyTorch checkpoint"):
        manager.load()


def test_readers_load_intact_files_exactly(tmp_path):
    """The readers change errors only: a valid file is read exactly (guards against over-eager rejection)."""
    from m2d2.convert import read_safetensors, torch_load_weights

    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path))
    for loaded in (read_safetensors(path), read_safetensors(path.read_bytes(), "blob"),
                   torch_load_weights(_torch_bytes(), "zip"), torch_load_weights(_torch_bytes(legacy=True), "legacy")):
        assert all(torch.equal(loaded[k], v) for k, v in _weights().items())


# ----------------------------------------------------------------------------- evaluation report
def test_report_renders_labels_with_dollars_literally(tmp_path):
    """Class names and clip titles come from datasets; matplotlib would parse ``$...$`` in them as mathtext, and
    ``50% $$`` or ``$x^$`` made it raise. They are drawn as they are, and the HTML still escapes them."""
    import html

    import matplotlib
    import numpy as np

    from m2d2.eval.reports import AttentionMap, build_report, report_html

    names = [r"$\frac{1}{0}$", "a$b", "50% $$", "$x^$", "<b>dog & cat</b>"]
    k = len(names)
    rng = np.random.default_rng(0)
    amap = AttentionMap(lms=rng.normal(size=(80, 64)), weights=rng.random((5, 4)), starts=np.arange(4) * 16,
                        patch_size=(16, 16), self_weight=0.25, title="clip $x^$ 50% $$")
    rc_before = dict(matplotlib.rcParams)
    out = build_report(tmp_path / "rep", "Report $x^$ <b>", {"Zero-shot $$": {"zs_acc $x^$": 0.5}},
                       confusion=np.diag(np.arange(1, k + 1)), class_names=names,
                       clip_features=rng.normal(size=(3 * k, 8)), clip_labels=list(range(k)) * 3, attention=[amap],
                       notes=["label with $$"])
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "confusion.png", "report.html", "tsne.png"]
    assert dict(matplotlib.rcParams) == rc_before  # the plain-text setting does not leak to the caller
    page = report_html(out)
    for name in names:
        assert f"<td>{html.escape(name)}</td>" in page
    assert "<b>dog" not in page and "Report $x^$ &lt;b&gt;" in page and "zs_acc $x^$" in page

"""The audio commands on bad input: one ``skipped <path>: <reason>`` line each, the rest still processed, exit 1,
never a traceback; and the decoding limits they expose (--max-seconds, --max-channels, --max-file-mb)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch.nn.functional as F

from m2d2 import cli
from m2d2.audio import DEFAULT_MAX_CHANNELS, DEFAULT_MAX_FILE_MB, load_audio
from m2d2.inference import SEARCH_MAX_SECONDS, search_folder

SR = 16000

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tone(path, seconds: float, channels: int = 1, sr: int = SR, fmt: str | None = None, freq: float = 440.0):
    t = np.arange(int(seconds * sr)) / sr
    data = np.stack([0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, format=fmt)
    return str(path)


@pytest.fixture
def bad_files(tmp_path) -> dict[str, str]:
    """Good files first and last, every kind of bad input in between."""
    files = {
        "good_ogg": _tone(tmp_path / "a.ogg", 1.2, fmt="OGG"),
        "empty": str(tmp_path / "empty.wav"),
        "missing": str(tmp_path / "missing.wav"),
        "garbage": str(tmp_path / "garbage.wav"),
        "nine_channels": _tone(tmp_path / "nine.wav", 0.5, channels=9),
        "too_short": _tone(tmp_path / "short.wav", 0.005),  # 80 samples: less than one analysis window
        "directory": str(tmp_path / "folder.wav"),
        "good_wav": _tone(tmp_path / "b.wav", 0.8, channels=2, sr=44100),
    }
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "garbage.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (tmp_path / "folder.wav").mkdir()
    return files


def _skipped(err: str) -> dict[str, str]:
    lines = [line for line in err.splitlines() if line.startswith("skipped ")]
    out = {}
    for line in lines:
        path, reason = line.removeprefix("skipped ").split(": ", 1)
        out[path] = reason
    return out


BAD = ("empty", "missing", "garbage", "nine_channels", "too_short", "directory")


def _check_skips(err: str, files: dict[str, str]) -> None:
    assert "Traceback" not in err
    skipped = _skipped(err)
    assert set(skipped) == {files[k] for k in BAD}, err
    assert len([line for line in err.splitlines() if line.startswith("skipped ")]) == len(BAD)  # one line each
    assert "empty (0 bytes)" in skipped[files["empty"]]
    assert skipped[files["missing"]] == "no such file"
    assert "cannot decode audio" in skipped[files["garbage"]]
    assert "9 channels" in skipped[files["nine_channels"]] and "max_channels" in skipped[files["nine_channels"]]
    assert "at least 201" in skipped[files["too_short"]]
    assert skipped[files["directory"]] == "not a regular file"


def test_embed_skips_bad_files_goes_on_and_exits_1(export, bad_files, capsys):
    assert cli.main(["embed", *bad_files.values(), "--model", export, "--kind", "clap"]) == 1
    out, err = capsys.readouterr()
    _check_skips(err, bad_files)
    assert out.splitlines() == [f"{bad_files['good_ogg']}: clap (64,)", f"{bad_files['good_wav']}: clap (64,)"]


def test_zeroshot_skips_bad_files_goes_on_and_exits_1(export, bad_files, capsys):
    assert cli.main(["zeroshot", *bad_files.values(), "--model", export, "--labels", "dog,rain,siren"]) == 1
    out, err = capsys.readouterr()
    _check_skips(err, bad_files)
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [bad_files["good_ogg"], bad_files["good_wav"]]
    assert all(line.count("(") == 3 for line in lines)
    # the example: a good file and an empty one
    assert cli.main(["zeroshot", bad_files["good_ogg"], bad_files["empty"], "--model", export, "--labels", "a,b"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{bad_files['good_ogg']}: ")
    assert err.strip() == f"skipped {bad_files['empty']}: audio {bad_files['empty']} is empty (0 bytes)"


def test_decoding_limits_on_the_command_line(export, embedder, tmp_path, capsys):
    long = _tone(tmp_path / "long.wav", 3.0, freq=300.0)
    nine = _tone(tmp_path / "nine.wav", 0.5, channels=9)
    out_dir = tmp_path / "out"
    assert cli.main(["embed", long, "--model", export, "--kind", "clap", "--max-seconds", "1",
                     "--out", str(out_dir)]) == 0
    err = capsys.readouterr().err
    assert f"note: {long}: only the first 1 s of 3.0 s are used (--max-seconds)" in err
    first_second = embedder.clap_audio([load_audio(long)[:SR]])[0].numpy()
    np.testing.assert_array_equal(np.load(out_dir / "long.clap.npy"), first_second)
    assert cli.main(["embed", long, "--model", export, "--kind", "clap", "--max-seconds", "0"]) == 0
    assert "note:" not in capsys.readouterr().err  # 0: the whole file
    assert cli.main(["embed", nine, "--model", export, "--max-channels", "9"]) == 0
    assert cli.main(["embed", nine, "--model", export]) == 1
    capsys.readouterr()
    assert cli.main(["embed", long, "--model", export, "--max-file-mb", "0.01"]) == 1
    reason = _skipped(capsys.readouterr().err)[long]
    assert "over the file size limit of 0.01 MiB (setting max_file_mb)" in reason


def test_cli_defaults_are_the_library_defaults():
    assert (cli.MAX_SECONDS, cli.MAX_CHANNELS, cli.MAX_FILE_MB) == (SEARCH_MAX_SECONDS, DEFAULT_MAX_CHANNELS,
                                                                     DEFAULT_MAX_FILE_MB)


def test_search_reports_bad_files_and_exits_by_what_it_found(export, tmp_path, capsys):
    folder = tmp_path / "sounds"
    _tone(folder / "good.wav", 0.7)
    _tone(folder / "nine.wav", 0.4, channels=9)
    (folder / "empty.wav").write_bytes(b"")
    assert cli.main(["search", str(folder), "--query", "a tone", "--model", export]) == 1  # some files failed
    out, err = capsys.readouterr()
    skipped = _skipped(err)
    assert set(skipped) == {str(folder / "nine.wav"), str(folder / "empty.wav")} and "Traceback" not in err
    assert "max_channels" in skipped[str(folder / "nine.wav")]
    assert out.split()[-1] == "good.wav"
    (folder / "good.wav").unlink()
    assert cli.main(["search", str(folder), "--query", "a tone", "--model", export]) == 1  # nothing searchable
    assert len(_skipped(capsys.readouterr().err)) == 2
    assert cli.main(["search", str(tmp_path / "nowhere"), "--query", "q", "--model", export]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_search_index_keeps_capped_embeddings_apart(embedder, tmp_path):
    folder = tmp_path / "s"
    long = _tone(folder / "long.wav", 2.5, freq=500.0)
    _tone(folder / "short.wav", 0.6)
    first = search_folder(embedder, "q", folder, max_seconds=1.0)
    assert (first.cached, first.embedded) == (0, 2)
    again = search_folder(embedder, "q", folder, max_seconds=1.0)
    assert (again.cached, again.embedded) == (2, 0)
    whole = search_folder(embedder, "q", folder, max_seconds=None)  # the long file needs a new embedding
    assert (whole.cached, whole.embedded) == (1, 1)
    text = F.normalize(embedder.clap_text(["q"]), dim=-1)[0]
    expected = float(F.normalize(embedder.clap_audio([load_audio(long)]), dim=-1)[0] @ text)
    assert dict((p.name, s) for p, s in whole.hits)["long.wav"] == pytest.approx(expected, abs=1e-5)
    capped = dict((p.name, s) for p, s in search_folder(embedder, "q", folder, max_seconds=1.0).hits)
    expected_capped = float(F.normalize(embedder.clap_audio([load_audio(long)[:SR]]), dim=-1)[0] @ text)
    assert capped["long.wav"] == pytest.approx(expected_capped, abs=1e-5)

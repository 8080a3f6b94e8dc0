"""m2d2.inference and the embed / zeroshot / search commands, on a tiny stage-2 export.

The tiny encoder trains on 72-frame crops (4 patch columns + 8 unused frames), the same geometry as the
released 1001-frame model (62 columns + 9 unused), so the chunk layout and its timestamps are exercised.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from m2d2 import cli
from m2d2.inference import (
    INDEX_DIR,
    Embedder,
    frame_starts,
    get_scene_embeddings,
    get_timestamp_embeddings,
    load_model,
    search_folder,
)

SR = 16000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wave(seconds: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(int(seconds * SR), generator=g)


# ----------------------------------------------------------------------------------------------------- layout
def test_frame_layout_matches_the_reference_counts():
    """Fact sheet §1.3: 10 s -> 62 frames with 1001-frame chunks, 63 with 608; 30 s -> 186 and 188."""
    assert len(frame_starts(1001, 1001, 16)) == 62
    assert len(frame_starts(1001, 608, 16)) == 63
    assert len(frame_starts(3001, 1001, 16)) == 186
    assert len(frame_starts(3001, 608, 16)) == 188
    starts = frame_starts(3001, 1001, 16)
    assert starts[61] == 61 * 16 and starts[62] == 1001  # a chunk's 9 unused frames: the next starts at 1001


def test_timestamps_follow_the_chunks_and_match_the_encoder(embedder):
    assert embedder.frame_seconds == pytest.approx(0.16)
    # 1 s = 101 log-mel frames -> padded to 112 -> chunk [0, 72) gives 4 columns, chunk [72, 112) gives 2.
    frames = embedder.frames([_wave(1.0, 0)])[0]
    starts = np.array([0, 16, 32, 48, 72, 88])
    assert frames.timestamps.tolist() == pytest.approx(((starts + 7.5) * 0.01).tolist())
    assert frames.features.shape == (6, 5 * 64)
    for seconds in (0.02, 0.15, 0.7, 0.72, 1.43, 2.9):
        n = int(seconds * SR)
        got = embedder.frames([_wave(seconds, 1)])[0]
        assert got.features.shape[0] == got.timestamps.shape[0] == len(embedder.timestamps(n))
        assert torch.all(got.timestamps.diff() > 0)


# ----------------------------------------------------------------------------------------------------- determinism
def test_same_clip_same_output_whatever_the_batch(embedder):
    """A clip alone and the same clip inside a list with clips of other lengths give bit-identical outputs."""
    a, b, c = _wave(0.9, 10), _wave(2.3, 11), _wave(0.31, 12)
    alone_frames = embedder.frames([a])[0]
    alone_clip = embedder.clip_features(a)
    alone_clap = embedder.clap_audio([a])
    mixed_frames = embedder.frames([b, a, c])
    assert torch.equal(mixed_frames[1].features, alone_frames.features)
    assert torch.equal(mixed_frames[1].timestamps, alone_frames.timestamps)
    assert torch.equal(embedder.clip_features([c, b, a])[2], alone_clip[0])
    assert torch.equal(embedder.clap_audio([a, b, c])[0], alone_clap[0])
    # an equal-length [B, S] batch goes through the same per-clip path
    stacked = embedder.clap_audio(torch.stack([a, _wave(0.9, 13), a]))
    assert torch.equal(stacked[0], alone_clap[0]) and torch.equal(stacked[2], alone_clap[0])
    # clip features are the time mean of the frame features
    torch.testing.assert_close(alone_clip[0], alone_frames.features.mean(0))


def test_clap_text_matches_the_model(embedder):
    texts = ["a dog barks", "rain on a tin roof", "a siren"]
    together = embedder.clap_text(texts)
    one_by_one = embedder.clap_text(texts, batch_size=1)
    assert together.shape == (3, 64)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)


def test_bad_audio_is_rejected_with_a_reason(embedder):
    with pytest.raises(ValueError, match="at least 201"):
        embedder.frames([torch.zeros(100)])
    with pytest.raises(ValueError, match="NaN"):
        embedder.clip_features([torch.tensor([float("nan")] * 4000)])
    with pytest.raises(ValueError, match=r"\[S\] or \[B, S\]"):
        embedder.clip_features(torch.zeros(1, 2, 4000))
    with pytest.raises(ValueError, match="float"):
        embedder.clip_features(torch.zeros(4000, dtype=torch.int16))


# ----------------------------------------------------------------------------------------------------- HEAR
def test_hear_api(export, embedder):
    model = load_model(export, device="cpu")
    assert isinstance(model, torch.nn.Module) and model.to("cpu") is model  # the HEAR validator moves it
    assert model.device == torch.device("cpu")
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 5 * 64
    audio = torch.stack([_wave(1.2, 20), _wave(1.2, 21)])
    scene = get_scene_embeddings(audio, model)
    emb, ts = get_timestamp_embeddings(audio, model)
    assert scene.shape == (2, 320)
    assert emb.shape == (2, ts.shape[1], 320) and ts.shape == (2, len(embedder.timestamps(audio.shape[1])))
    torch.testing.assert_close(ts[0].double(), embedder.timestamps(audio.shape[1]) * 1000)  # milliseconds
    assert torch.equal(scene, embedder.clip_features(audio))
    torch.testing.assert_close(scene, emb.mean(dim=1))
    with pytest.raises(ValueError, match="n_sounds"):
        get_scene_embeddings(audio[0], model)


# ----------------------------------------------------------------------------------------------------- CLI
def _write(path, wave: torch.Tensor, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.numpy(), sr)


def test_search_ranks_by_cosine_and_caches_by_content(export, embedder, tmp_path, capsys):
    folder = tmp_path / "sounds"
    waves = {f"a{i}.wav": _wave(0.5 + 0.4 * i, 30 + i) for i in range(4)}
    for name, wave in waves.items():
        _write(folder / name, wave)
    _write(folder / "sub" / "copy.flac", waves["a0.wav"])  # same audio, other bytes: its own index row
    (folder / "broken.wav").write_bytes(b"RIFF not really a wave file")

    # exit 1: one file failed (it is reported, and the others are still ranked)
    assert cli.main(["search", "--query", "a siren wails", str(folder), "--model", export, "--top", "3"]) == 1
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert "broken.wav" in err and "5 files (0 cached, 5 embedded, 1 skipped)" in err

    # the scores are the cosine between the file's CLAP embedding and the query's
    text = F.normalize(embedder.clap_text(["a siren wails"]), dim=-1)[0]
    from m2d2.audio import load_audio

    expected = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".wav", ".flac") and path.name != "broken.wav":
            audio = F.normalize(embedder.clap_audio([load_audio(path)]), dim=-1)[0]
            expected[str(path.relative_to(folder))] = float(audio @ text)
    best = sorted(expected.items(), key=lambda kv: -kv[1])[:3]
    got = [(line.split()[2], float(line.split()[1])) for line in lines]
    assert [name for name, _ in got] == [name for name, _ in best]
    assert [score for _, score in got] == pytest.approx([score for _, score in best], abs=1e-4)

    # index: Parquet + JSON only (nothing to unpickle)
    index_files = sorted(p.name for p in (folder / INDEX_DIR).rglob("*") if p.is_file())
    assert index_files == ["clap_audio.parquet", "model.json"]
    table = next((folder / INDEX_DIR).rglob("clap_audio.parquet"))
    assert table.read_bytes()[:4] == b"PAR1"
    meta = json.loads(next((folder / INDEX_DIR).rglob("model.json")).read_text())
    assert meta["fingerprint"] == embedder.audio_fingerprint() and meta["dim"] == 64

    # second search: everything from the cache; a renamed file keeps its entry
    (folder / "a1.wav").rename(folder / "renamed.wav")
    result = search_folder(embedder, "rain", folder, top=10)
    assert (result.cached, result.embedded, len(result.skipped)) == (5, 0, 1)
    assert {p.name for p, _ in result.hits} == {"a0.wav", "renamed.wav", "a2.wav", "a3.wav", "copy.flac"}


def test_search_index_is_per_audio_model(export, tmp_path):
    folder = tmp_path / "s"
    _write(folder / "x.wav", _wave(0.6, 40))
    first = Embedder.from_pretrained(export)
    second = Embedder.from_pretrained(export)
    with torch.no_grad():
        second.model.audio_proj.sem_token.add_(0.5)  # another projector: other embeddings, other index
    cache = tmp_path / "cache"
    r1 = search_folder(first, "q", folder, cache_dir=cache)
    r2 = search_folder(second, "q", folder, cache_dir=cache)
    assert (r1.embedded, r2.embedded) == (1, 1)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert search_folder(first, "q", folder, cache_dir=cache).cached == 1
    assert not (folder / INDEX_DIR).exists()


def test_embed_and_zeroshot_commands(export, embedder, tmp_path, capsys):
    path = tmp_path / "clip.wav"
    _write(path, _wave(1.5, 50))
    out_dir = tmp_path / "feats"
    assert cli.main(["embed", str(path), "--model", export, "--kind", "frames", "--out", str(out_dir)]) == 0
    frames = np.load(out_dir / "clip.frames.npy")
    timestamps = np.load(out_dir / "clip.timestamps.npy")
    assert frames.shape == (len(timestamps), 320)
    assert timestamps.tolist() == pytest.approx(embedder.timestamps(int(1.5 * SR)).tolist())
    assert cli.main(["embed", str(path), "--model", export, "--kind", "clap"]) == 0
    assert "clap (64,)" in capsys.readouterr().out
    assert cli.main(["zeroshot", str(path), "--model", export, "--labels", "blues,jazz,rock", "--task", "gtzan",
                     "--top", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: ") and line.count("(") == 2

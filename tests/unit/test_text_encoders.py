"""Offline text-encoder plug-ins: shipped MiniLM (unchanged vectors), pooling kinds, sentence-transformers and an
NV-Embed-style remote-code model (a tiny stand-in written here, loaded the way NV-Embed-v2 is)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from m2d2.io import resolve_model_path
from m2d2.models import OfflineTextConfig
from m2d2.text import OfflineTextEncoder
from m2d2.text.cache import CaptionEmbeddings, embed_captions
from m2d2.text.encoders import RemoteCodePolicy, remote_code_digest
from tests.helpers import MINILM

CAPTIONS = ["a dog barks", "rain falls softly on a tin roof while thunder rolls in the distance", "a bell"]

# An NV-Embed-v2 look-alike: remote code in the model directory, its own encode(prompts, instruction, max_length),
# un-normalised 4096-d output. The real model is loaded the same way (AutoModel + trust_remote_code, offline).
STANDIN_CODE = textwrap.dedent('''
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


    class TinyEmbedConfig(PretrainedConfig):
        model_type = "tiny_nv_embed"

        def __init__(self, vocab=256, hidden=16, dim=4096, **kwargs):
            self.vocab, self.hidden, self.dim = vocab, hidden, dim
            super().__init__(**kwargs)


    class TinyEmbedModel(PreTrainedModel):
        config_class = TinyEmbedConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab, config.hidden)
            self.out = torch.nn.Linear(config.hidden, config.dim)
            self.post_init()

        def _init_weights(self, module):
            pass

        @torch.no_grad()
        def encode(self, prompts, instruction="", max_length=4096, **kwargs):
            ids = [list((instruction + p).encode("utf-8"))[:max_length] for p in prompts]
            width = max(len(i) for i in ids)
            tokens = torch.zeros(len(ids), width, dtype=torch.long)
            mask = torch.zeros(len(ids), width, 1)
            for k, i in enumerate(ids):
                tokens[k, : len(i)] = torch.tensor(i)
                mask[k, : len(i)] = 1
            tokens, mask = tokens.to(self.out.weight.device), mask.to(self.out.weight)
            pooled = (self.embed(tokens) * mask).sum(1) / mask.sum(1)
            return 8.0 * self.out(torch.tanh(pooled))
''')


def make_standin(folder, dim: int = 4096, seed: int = 0):
    """Write the stand-in model directory (code, config with auto_map, safetensors weights)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modeling_tiny.py").write_text(STANDIN_CODE)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tiny_nv_embed", "architectures": ["TinyEmbedModel"], "vocab": 256, "hidden": 16, "dim": dim,
        "auto_map": {"AutoConfig": "modeling_tiny.TinyEmbedConfig", "AutoModel": "modeling_tiny.TinyEmbedModel"}}))
    rng = np.random.default_rng(seed)
    save_file({"embed.weight": rng.standard_normal((256, 16)).astype(np.float32),
               "out.weight": (rng.standard_normal((dim, 16)) / 4).astype(np.float32),
               "out.bias": np.zeros(dim, dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return make_standin(tmp_path_factory.mktemp("nv") / "tiny_nv_embed")


@pytest.fixture(scope="module")
def minilm():
    return OfflineTextEncoder(OfflineTextConfig())


def test_default_is_the_shipped_minilm_with_unchanged_vectors(minilm):
    """Same computation as before the plug-ins: tokenizer -> BertModel -> mean over the mask, float32, bit for bit."""
    from transformers import AutoModel, AutoTokenizer

    assert (minilm.config.kind, minilm.config.path, minilm.config.dim) == ("hf-mean-pool", MINILM, 384)
    path = resolve_model_path(MINILM)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        tokens = tokenizer(CAPTIONS, padding=True, truncation=True, max_length=512, return_tensors="pt")
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        expected = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    got = minilm.encode(CAPTIONS)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert minilm.dtype == torch.float32  # "auto" on CPU


def test_pooling_kinds_on_a_small_local_bert(tmp_path):
    """CLS and last-token pooling pick the right positions under right padding (checked one caption at a time)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(tmp_path / "bert")
    single = {}
    for kind in ("hf-cls", "hf-last-token", "hf-mean-pool"):
        enc = OfflineTextEncoder(OfflineTextConfig(kind=kind, path=str(tmp_path / "bert"), dim=32, max_length=64))
        batch = enc.encode(CAPTIONS)
        alone = torch.cat([enc.encode([c]) for c in CAPTIONS])  # no padding at all
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        single[kind] = alone
    assert not torch.allclose(single["hf-cls"], single["hf-last-token"])
    assert not torch.allclose(single["hf-cls"], single["hf-mean-pool"])
    with pytest.raises(ValueError, match="gives vectors of shape"):
        OfflineTextEncoder(OfflineTextConfig(kind="hf-cls", path=str(tmp_path / "bert"), dim=48)).encode(["x"])
    with pytest.raises(ValueError, match="unknown offline text encoder kind"):
        OfflineTextEncoder(OfflineTextConfig(kind="word2vec", path=str(tmp_path / "bert"), dim=32))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        OfflineTextEncoder(OfflineTextConfig(kind="hf-cls", path="sentence-transformers/all-MiniLM-L6-v2", dim=384))


def test_sentence_transformers_kind_runs_the_models_own_modules(minilm):
    """The shipped MiniLM directory is also a sentence-transformers model: mean pooling + its Normalize layer."""
    pytest.importorskip("sentence_transformers")
    enc = OfflineTextEncoder(OfflineTextConfig(kind="sentence-transformers", path=MINILM, dim=384))
    got = enc.encode(CAPTIONS)
    torch.testing.assert_close(got, torch.nn.functional.normalize(minilm.encode(CAPTIONS), dim=-1),
                               atol=2e-5, rtol=1e-4)


def test_nv_embed_style_remote_code_model(standin, tmp_path):
    """Loaded offline from its directory with trust_remote_code; encode() gets the instruction and max_length;
    4096-d vectors are stored un-normalised in float16, also when computed in bf16."""
    cfg = OfflineTextConfig(kind="nv-embed-v2", path=str(standin), dim=4096, max_length=32768)
    allowed = RemoteCodePolicy(trust=True, sha256=remote_code_digest(standin))  # the user's explicit choice
    plain = OfflineTextEncoder(cfg, remote_code=allowed)
    vec = plain.encode(CAPTIONS)
    assert vec.shape == (3, 4096) and vec.dtype == torch.float32
    norms = vec.norm(dim=-1)
    assert (norms - 1).abs().min() > 0.5  # not L2-normalised, as the reference stores NV-Embed-v2 vectors
    own = plain.plugin.model.encode(CAPTIONS, instruction="", max_length=32768)
    assert torch.equal(vec, own.float())
    prompted = OfflineTextEncoder(cfg, instruction="Instruct: describe the sound\nQuery: ",
                                  remote_code=allowed).encode(CAPTIONS)
    expected = plain.plugin.model.encode(CAPTIONS, instruction="Instruct: describe the sound\nQuery: ")
    assert torch.equal(prompted, expected.float()) and not torch.allclose(prompted, vec)
    half = OfflineTextEncoder(cfg, dtype="bfloat16", remote_code=allowed)
    assert half.dtype == torch.bfloat16 and next(half.plugin.model.parameters()).dtype == torch.bfloat16
    assert half.encode(CAPTIONS).dtype == torch.float32
    torch.testing.assert_close(half.encode(CAPTIONS), vec, atol=0.1, rtol=0.05)

    rows = embed_captions(CAPTIONS[1:] + ["a  dog BARKS"], cfg, tmp_path / "caps.parquet", bucket=True, encoder=plain)
    cache = CaptionEmbeddings(tmp_path / "caps.parquet")
    assert rows == 3 and cache.dim == 4096 and "a dog barks" in cache  # found through its normalised key
    stored = cache.lookup(CAPTIONS[1:])
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), vec[1:].numpy(), rtol=1e-3, atol=1e-3)
    variant = plain.encode(["a  dog BARKS"])[0].numpy()  # the spelling that was given is the one embedded
    np.testing.assert_allclose(cache.lookup(["a dog barks"])[0].astype(np.float32), variant, rtol=1e-3, atol=1e-3)
    cache.check_encoder(cfg)

"""Two gloo processes, each holding half of the global batch, against one process holding all of it.

Checks the fact-sheet section 10 semantics: with gradients gathered and c = 1 the loss and the reduced
parameter gradients equal the single-process ones; c = 1/W reproduces the reference's no-grad gather.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m2d2.models import M2D2
from tests.helpers import tiny_config

WORLD = 2
BATCH = 8


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    lms, text = torch.randn(BATCH, 80, 64, generator=gen) * 3 - 5, torch.randn(BATCH, 48, generator=gen)
    return lms.to(dtype), text.to(dtype)


def _model(feature_grad_scale: float, local_loss: bool, dtype: torch.dtype) -> M2D2:
    torch.manual_seed(0)
    cfg = tiny_config(text_dim=48, feature_grad_scale=feature_grad_scale)
    cfg.clap.local_loss = local_loss
    model = M2D2(cfg, with_m2d=False).to(dtype)
    model.requires_grad_(True)
    return model


def _clap_loss(model: M2D2, lms: torch.Tensor, text: torch.Tensor, gather: str = "ours") -> torch.Tensor:
    """The CLAP term of stage 1 without masking (deterministic), optionally with the reference's gather."""
    audio = model.audio_proj(model.encoder(model.normalize(lms))[:, 1:])
    text_feat = model.encode_clap_text(text)
    if gather == "ours":
        return model.clip_loss(audio, text_feat, model.logit_scale)
    # Reference: gather without gradient, put the local slice back, full global loss on every rank.
    audio, text_feat = (torch.nn.functional.normalize(x, dim=-1) for x in (audio, text_feat))
    gathered = []
    for local in (audio, text_feat):
        parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.detach())
        parts[dist.get_rank()] = local
        gathered.append(torch.cat(parts))
    logits = model.logit_scale.exp() * gathered[0] @ gathered[1].T
    labels = torch.arange(logits.shape[0])
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


def _grads(model: M2D2) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, out_file: str, scale: float, local_loss: bool, gather: str, dtype) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model(scale, local_loss, dtype)
        lms, text = _inputs(dtype)
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        loss = _clap_loss(model, lms[part], text[part], gather)
        loss.backward()
        reduced = torch.stack([loss.detach()])
        dist.all_reduce(reduced)
        grads = _grads(model)
        for grad in grads.values():  # data-parallel averaging, as DDP / DeepSpeed do
            dist.all_reduce(grad)
            grad /= WORLD
        if rank == 0:
            torch.save({"loss": reduced / WORLD, "grads": grads}, out_file)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path, scale: float, local_loss: bool, gather: str = "ours", dtype=torch.float32) -> dict:
    tag = f"{scale}-{local_loss}-{gather}-{dtype}"
    out, init = tmp_path / f"out-{tag}.pt", tmp_path / f"init-{tag}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(init), str(out), scale, local_loss, gather, dtype), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


def _single_process(scale: float = 1.0, dtype=torch.float32) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model(scale, local_loss=True, dtype=dtype)
    lms, text = _inputs(dtype)
    loss = _clap_loss(model, lms, text)
    loss.backward()
    return loss.item(), _grads(model)


@pytest.mark.slow
@pytest.mark.parametrize(("local_loss", "dtype"), [(True, torch.float64), (False, torch.float64), (True, torch.float32)])
def test_two_rank_loss_and_gradients_equal_single_process(tmp_path, local_loss, dtype):
    loss, grads = _single_process(dtype=dtype)
    result = _run_two_ranks(tmp_path, scale=1.0, local_loss=local_loss, dtype=dtype)
    assert result["loss"].item() == pytest.approx(loss, abs=1e-6)
    assert set(result["grads"]) == set(grads)
    assert {"logit_scale", "encoder.blocks.0.attn.qkv.weight", "audio_proj.sem_token", "text_proj.weight"} <= set(grads)
    # float64 shows the equality is exact; in float32 the zero-initialised semantic token's gradient (|g| ~ 13,
    # amplified by LayerNorm at a zero input) carries ~1e-6 relative rounding, hence the relative term.
    rtol = 0 if dtype == torch.float64 else 2e-6
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=rtol, msg=name)
        if dtype == torch.float64:
            assert (result["grads"][name] - grad).abs().max() < 1e-10, name


@pytest.mark.slow
def test_grad_scale_one_over_world_reproduces_reference_gather(tmp_path):
    f64 = torch.float64
    ours = _run_two_ranks(tmp_path, scale=1.0 / WORLD, local_loss=True, dtype=f64)
    reference = _run_two_ranks(tmp_path, scale=1.0, local_loss=True, gather="reference", dtype=f64)
    assert ours["loss"].item() == pytest.approx(reference["loss"].item(), abs=1e-6)
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(ours["grads"][name], grad, atol=1e-10, rtol=1e-9, msg=name)
    _, exact = _single_process(dtype=f64)
    # In the reference the features get 1/W of the exact gradient, the temperature all of it.
    torch.testing.assert_close(reference["grads"]["logit_scale"], exact["logit_scale"], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(reference["grads"]["text_proj.weight"], exact["text_proj.weight"] / WORLD,
                               atol=1e-10, rtol=1e-9)

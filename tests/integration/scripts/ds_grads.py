"""Loss and reduced gradients of one stage-1 or stage-2 step under DeepSpeed (gloo), for the equality tests.

Run as a module with torchrun (2 processes: each rank takes its half of the global batch) or plain python (one
process, the whole batch): ``python -m tests.integration.scripts.ds_grads STAGE OUT DTYPE ACCUM`` with the repository
on PYTHONPATH (:func:`tests.helpers.subprocess_env`). Writes {"loss": ..., "grads": {...}} from rank 0.
"""

import sys

import torch
import torch.distributed as dist

from m2d2.models import M2D2, PatchMask
from m2d2.train.config import OptimConfig, ScheduleConfig, TrainStageConfig
from m2d2.train.engine import deepspeed_config, init_distributed
from m2d2.train.objectives import clap_step
from tests.helpers import tiny_bert, tiny_config

BATCH = 8
CAPTIONS = ["a dog barks", "rain on a roof", "a bell rings twice", "wind in trees", "a car horn honks",
            "birds sing at dawn", "a drum beats fast", "an engine hums low"]


def build(stage: str, dtype: torch.dtype) -> M2D2:
    torch.manual_seed(0)
    model = M2D2(tiny_config(text_dim=48))
    if stage == "stage2":
        bert = tiny_bert(hidden=64)
        bert.config.update({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
        model.start_stage2(bert)
    else:
        model.set_stage("stage1")
    return model.to(dtype)


def inputs(stage: str, model: M2D2, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    lms = (torch.randn(BATCH, 80, 64, generator=gen) * 3 - 5).to(dtype)
    text = CAPTIONS if stage == "stage2" else torch.randn(BATCH, 48, generator=gen).to(dtype)
    mask = model.make_mask(BATCH, 64, generator=torch.Generator().manual_seed(2))
    return lms, text, mask


def run(stage: str, dtype: torch.dtype, accum: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One DeepSpeed step on this rank's share of the batch; returns (mean loss over ranks, reduced grads)."""
    import deepspeed

    rank, world = init_distributed()
    model = build(stage, dtype)
    lms, text, mask = inputs(stage, model, dtype)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    lms, text = lms[part], text[part]
    mask = PatchMask(mask.ids_keep[part], mask.ids_masked[part])
    cfg = TrainStageConfig(stage=stage, schedule=ScheduleConfig(global_batch=BATCH, accum_steps=accum),
                           optim=OptimConfig(grad_clip=1e9))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, world, torch.device("cpu")))
    grads: dict[str, torch.Tensor] = {}
    original_step = engine.step

    def step_and_record():  # gradients after DeepSpeed's reduction, before the (lr 0) update
        if engine.is_gradient_accumulation_boundary():
            for name, param in model.named_parameters():
                if param.grad is not None:
                    grads[name] = param.grad.detach().clone()
        original_step()

    engine.step = step_and_record
    loss = clap_step(engine, model, lms, text, mask, accum)["loss"].detach().reshape(1).to(torch.float64)
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return loss, grads


if __name__ == "__main__":
    stage, out, dtype, accum = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[4])
    loss, grads = run(stage, dtype, accum)
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    dist.barrier()

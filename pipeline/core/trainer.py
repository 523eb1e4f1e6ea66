"""One training loop for the teacher and the KD fine-tune.

AdamW, linear warm-up then cosine decay (per step), gradient clipping, optional
EMA of the weights, AMP (bf16/fp16) on CUDA, and PyTorch's own distributed engine:
the same call runs single-process or under ``torchrun --nproc_per_node N`` (DDP
with a DistributedSampler; logging and checkpoints on rank 0 only).

Checkpoints are written atomically once per epoch, and on SIGTERM/SIGINT at the
current step. ``resume=True`` restores the model, optimizer, scheduler, scaler,
EMA, RNG states, the epoch/step position and the epoch's losses so far, so an
interrupted run finishes with the same weights and log as an uninterrupted one
(bit-identical on CPU), also mid-epoch, with random train transforms and loader
workers: the loader's order, each sample's augmentation and the workers' seeds are
functions of (seed, epoch, sample) (:func:`~vitrim.pipeline.core.data.make_loader`),
and the loader starts at the saved batch without loading the skipped ones.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from vitrim.pipeline.core.data import make_loader, set_epoch
from vitrim.pipeline.core.device import collective_device, init_distributed, mean_over_ranks
from vitrim.pipeline.core.errors import Interrupted, UserError
from vitrim.pipeline.core.rundir import RunDir

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainSpec:
    epochs: int
    batch_size: int
    lr: float
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    clip_grad: Optional[float] = 1.0
    ema: Optional[float] = None
    amp: str = "auto"
    seed: int = 0
    hflip: bool = False
    workers: int = 0  # DataLoader workers (image folders)
    max_steps_per_epoch: Optional[int] = None  # for quick checks


@dataclass
class TrainResult:
    history: list = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: Optional[int] = None
    interrupted: bool = False


def _lr_lambda(spec: TrainSpec, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, spec.epochs * steps_per_epoch)
    warm = int(spec.warmup_epochs * steps_per_epoch)
    floor = spec.min_lr / spec.lr if spec.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _rng_state() -> dict:
    # plain types and tensors only, so checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)],
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fingerprint(model: nn.Module) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _amp_ctx(spec: TrainSpec, device: str):
    if not device.startswith("cuda") or spec.amp == "off":
        return nullcontext(), None
    dtype = torch.float16 if spec.amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def load_checkpoint(path: Path, model: nn.Module) -> dict:
    """Read a training checkpoint and check it belongs to ``model``."""
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError("finetune", f"checkpoint '{path}' is corrupt ({type(e).__name__}: {e})",
                        "delete it and train from scratch (drop --resume)") from None
    if not isinstance(ck, dict) or "model" not in ck or "fingerprint" not in ck:
        raise UserError("finetune", f"'{path}' is not a vitrim training checkpoint", "delete it or point --out elsewhere")
    if ck["fingerprint"] != _fingerprint(model):
        raise UserError("finetune", f"checkpoint '{path}' was made for a different model (shapes differ)",
                        "resume with the same plan/config, or use a fresh output directory")
    return ck


def train(model: nn.Module, loss_fn: LossFn, train_ds: Dataset, spec: TrainSpec, out_dir: str | os.PathLike,
          val_fn: Optional[Callable[[nn.Module], float]] = None, resume: bool = False, device: str = "cpu",
          desc: str = "train", log: Callable[[str], None] = print, stop_after: Optional[int] = None) -> TrainResult:
    """Train ``model`` in place; checkpoints go to ``out_dir/checkpoint.pt``.

    ``stop_after`` ends this invocation after that many epochs (a checkpoint is
    written; ``resume=True`` continues). Useful for job-chunked clusters.
    """
    from vitrim.pipeline.core.io import atomic_save

    rank, world = init_distributed(device)
    out = Path(out_dir)
    ckpt_path = RunDir(out).checkpoint
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    np.random.seed(spec.seed)
    model.to(device)
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim > 1 and "pos_embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
    loader = make_loader(train_ds, spec.batch_size, shuffle=True, seed=spec.seed, drop_last=True, distributed=world > 1,
                         workers=spec.workers, pin_memory=device.startswith("cuda"))
    steps_per_epoch = len(loader) if spec.max_steps_per_epoch is None else min(len(loader), spec.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise UserError("train", f"{len(train_ds)} training images are fewer than one batch of {spec.batch_size}",
                        "lower the batch size or use more data")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec, steps_per_epoch))
    autocast, scaler = _amp_ctx(spec, device)
    ema = None
    if spec.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema))
    result = TrainResult()
    start_epoch, start_step = 0, 0
    resumed_losses: list[torch.Tensor] = []
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, model)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema"):
            ema.load_state_dict(ck["ema"])
        _set_rng_state(ck["rng"][min(rank, len(ck["rng"]) - 1)])
        start_epoch, start_step = ck["epoch"], ck["step"]
        done_losses = ck.get("epoch_losses") or []
        # this rank's losses of the interrupted epoch's finished steps, so the epoch's mean is the full one
        resumed_losses = [torch.tensor(v, dtype=torch.float32, device=device) for v in done_losses[min(rank, len(done_losses) - 1)]] if done_losses else []
        result.history = ck.get("history", [])
        result.resumed_from = start_epoch
        if rank == 0:
            log(f"[{desc}] resumed from {ckpt_path} at epoch {start_epoch}, step {start_step}")

    def save(epoch: int, step: int, losses: list) -> None:
        per_rank = [(_rng_state(), [float(v) for v in losses])]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, per_rank[0])
            per_rank = gathered
        if rank != 0:
            return
        ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "scaler": scaler.state_dict() if scaler is not None else None,
              "ema": ema.state_dict() if ema is not None else None, "rng": [r for r, _ in per_rank],
              "epoch": epoch, "step": step, "epoch_losses": [v for _, v in per_rank] if step else None,
              "history": result.history, "spec": asdict(spec), "fingerprint": _fingerprint(model)}
        atomic_save(ckpt_path, lambda tmp: torch.save(ck, str(tmp)))

    stop = {"sig": None}

    def handler(signum, frame):  # noqa: ARG001
        stop["sig"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    t0 = time.time()
    try:
        from tqdm import tqdm

        for epoch in range(start_epoch, spec.epochs):
            ddp_model.train()
            skip = start_step if epoch == start_epoch else 0
            # data position on resume: the loader starts at the saved batch of the epoch's seeded order
            set_epoch(loader, epoch, spec.seed, start_batch=skip)
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"[{desc}] epoch {epoch + 1}/{spec.epochs}",
                       disable=rank != 0 or not sys.stderr.isatty(), leave=False)
            losses = resumed_losses if skip else []
            ep_t0 = time.time()
            for step, batch in enumerate(loader, start=skip):
                if step >= steps_per_epoch:
                    break
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                if spec.hflip:
                    flip = torch.rand(x.shape[0], device=x.device) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                with autocast:
                    loss = loss_fn(ddp_model, x, y)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if spec.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), spec.clip_grad)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                losses.append(loss.detach())
                bar.update(1)
                if not bar.disable:  # .item() syncs the GPU: only when someone watches the bar
                    bar.set_postfix(loss=f"{losses[-1].item():.3f}")
                if _stop_requested(stop, world, device):
                    save(epoch, step + 1, losses)
                    raise Interrupted(stop["sig"] or signal.SIGTERM, ckpt_path)
            bar.close()
            eval_model = ema.module if ema is not None else model
            val = val_fn(eval_model) if (val_fn is not None and rank == 0) else None
            # the logged loss is the mean over every rank's steps, not rank 0's alone
            ep_loss = mean_over_ranks(float(torch.stack(losses).float().mean()), device) if losses else None
            rec = {"epoch": epoch + 1, "train_loss": ep_loss,
                   "val_top1": val, "lr": sched.get_last_lr()[0], "epoch_s": round(time.time() - ep_t0, 1)}
            result.history.append(rec)
            if rank == 0:
                loss_s = "n/a" if rec["train_loss"] is None else f"{rec['train_loss']:.4f}"  # no step ran here
                msg = f"[{desc}] epoch {epoch + 1}/{spec.epochs}  loss {loss_s}"
                if val is not None:
                    msg += f"  holdout top-1 {val:.2f}%"
                log(msg + f"  ({rec['epoch_s']}s)")
            save(epoch + 1, 0, [])
            if _stop_requested(stop, world, device):
                raise Interrupted(stop["sig"] or signal.SIGTERM, ckpt_path)
            if stop_after is not None and epoch + 1 - start_epoch >= stop_after and epoch + 1 < spec.epochs:
                result.interrupted = True
                result.wall_s = time.time() - t0
                return result
        if ema is not None:
            model.load_state_dict(ema.module.state_dict())
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    result.wall_s = time.time() - t0
    return result


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop_requested(stop: dict, world: int, device: str = "cpu") -> bool:
    flag = stop["sig"] is not None
    if world > 1:  # every rank must stop at the same step; NCCL reduces only CUDA tensors
        t = torch.tensor([int(flag)], device=collective_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag

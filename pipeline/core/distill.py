"""Knowledge-distillation loss (Hinton et al. 2015; DeiT's two-head variant).

``loss = CE(y, label_smoothing) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``.
For distilled DeiT students (a second, distillation head) both heads get the
loss and it is averaged. ``finetune.hidden_weight`` adds hidden-state
distillation (:func:`hidden_loss`, the residual stream after every kept block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_term(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1), reduction="batchmean",
                    log_target=True) * (T * T)


def kd_loss(student_out, teacher_logits: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, T: float = 2.0,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """CE + alpha * T^2 * KL; ``student_out`` is logits or a (cls, dist) pair of logits."""
    heads = student_out if isinstance(student_out, (tuple, list)) else (student_out,)
    total = 0.0
    for s in heads:
        s = s.float()
        total = total + F.cross_entropy(s, y, label_smoothing=label_smoothing) + alpha * kd_term(s, teacher_logits.float(), T)
    return total / len(heads)


def hidden_loss(student_states: list, teacher_states: list, keep) -> torch.Tensor:
    """Hidden-state distillation: the mean over blocks of ``||s - t[..., keep]||^2 / ||t[..., keep]||^2``.

    Each pair is one kept teacher block's output in the student and in the teacher (B, tokens, channels); the
    student keeps the channels ``keep`` of the teacher's residual stream. Token by token while both have the
    same tokens; after a token merge, their token means (a merge is a weighted average of tokens). ``keep``: a
    list or index tensor, or None for every channel."""
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        t = t if keep is None else t.index_select(-1, torch.as_tensor(keep, device=t.device))
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1), t.mean(1)
        total = total + (s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
    return total / max(1, len(student_states))


def make_kd_fn(teacher: torch.nn.Module, alpha: float, T: float, label_smoothing: float = 0.0,
               hidden_weight: float = 0.0):
    """A ``loss_fn(model, x, y)`` that distils from a frozen teacher in eval mode.

    ``hidden_weight`` > 0 (``finetune.hidden_weight``, a sliced :class:`~vitrim.pipeline.core.compact.CompactViT`
    student of a timm teacher) adds ``hidden_weight * hidden_loss`` over the student's blocks and the teacher
    blocks they were sliced from."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def fn(model, x, y):
        if not hidden_weight:
            with torch.no_grad():
                t = teacher(x)
            return kd_loss(model(x), t, y, alpha, T, label_smoothing)
        m = getattr(model, "module", model)  # DDP
        if id(m) not in cache:  # the student's channels, once per student, on its device (None: all of them)
            keep = m.plan.embed_keep
            cache[id(m)] = (None if len(keep) == m.plan.spec["embed_dim"] else
                            torch.tensor(keep, device=next(m.parameters()).device))
        t_states, s_states = [], []
        hooks = [teacher.blocks[i].register_forward_hook(lambda mod, a, out: t_states.append(out))
                 for i in m.block_ids]
        hooks += [b.register_forward_hook(lambda mod, a, out: s_states.append(out)) for b in m.blocks]
        try:
            with torch.no_grad():
                t = teacher(x)
            out = model(x)
        finally:
            for h in hooks:
                h.remove()
        return (kd_loss(out, t, y, alpha, T, label_smoothing)
                + hidden_weight * hidden_loss(s_states, t_states, cache[id(m)]))

    cache: dict = {}
    return fn

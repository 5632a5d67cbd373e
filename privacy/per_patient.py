"""Per-patient clipped gradient sums for models whose trained weights all live in ``nn.Linear``
layers (every twinfed model: the hybrid's encoder and correction, the neural surrogate).

What it computes is what Opacus's ``hooks`` mode and ``DPOptimizer.clip_and_accumulate`` compute:
each patient's gradient (the loss is the batch mean, so a patient's gradient is the batch size
times its share, Opacus's ``loss_reduction="mean"``), its L2 norm over all weights, the clip
factor ``min(1, C / (norm + 1e-6))``, and the sum of the clipped gradients, left in ``p.grad``.
Noise, the division by the expected batch and the optimiser step stay with Opacus
(``DPOptimizerFastGradientClipping``: the part Opacus's own ghost clipping uses).

Why it is faster than ``hooks``: a patient's gradient of a Linear layer is ``G_b^T A_b`` (its
``k`` windows' output gradients ``G_b`` and inputs ``A_b``); its norm is taken either from that
product or, when cheaper, from the two ``k x k`` Gram matrices (``||G^T A||^2 = <G G^T, A A^T>``,
"ghost" norms), and the clipped sum is one matrix product per layer, as a plain step's weight
gradient is. Nothing of size ``batch x weights`` is kept, and autograd never computes the
unclipped weight gradients.

The patient dimension must come first in every Linear input (``[B, ..., in]``); a layer used
twice in one forward pass adds both uses to each patient's gradient. A model with any other
trained parameter is not handled (:func:`unsupported`): the caller falls back to Opacus's hooks.
"""

from __future__ import annotations

import torch
from torch import nn

# Opacus's clip factor: max_grad_norm / (norm + 1e-6), at most 1 (DPOptimizer.clip_and_accumulate).
_NORM_EPS = 1e-6


def unsupported(model: nn.Module) -> str | None:
    """Why this module cannot use per-patient Linear gradients, or None when it can: every
    trained parameter must be the weight or bias of exactly one ``nn.Linear`` whose weight is
    trained."""
    linear: set[int] = set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            if not module.weight.requires_grad:
                return f"layer {name or 'model'} has a frozen weight"
            if module.bias is not None and not module.bias.requires_grad:
                return f"layer {name or 'model'} has a frozen bias"
            for p in (module.weight, module.bias):
                if p is None:
                    continue
                if id(p) in linear:
                    return f"layer {name or 'model'} shares a parameter with another layer"
                linear.add(id(p))
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in linear:
            return f"parameter {name} is not a Linear layer's weight or bias"
    return None


class _TappedLinear(torch.autograd.Function):
    """``F.linear`` whose backward passes the input's gradient on and records (input, output
    gradient) for the layer instead of computing the weight's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, tape):
        ctx.save_for_backward(x, weight)
        ctx.tape = tape
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        ctx.tape.append((x, grad_out))
        grad_in = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        return grad_in, None, None, None


class PerPatientLinear(nn.Module):
    """``model`` with its Linear layers tapped: after ``loss.backward()`` on a batch of patients,
    :meth:`clip_and_sum` puts the sum of the per-patient clipped gradients into ``p.grad``.
    The wrapper shares the model's parameters; :meth:`cleanup` restores the plain layers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"per-patient Linear gradients cannot handle this model: {reason}")
        self._module = model
        self.layers = [m for m in model.modules() if type(m) is nn.Linear]
        self.tapes: dict[nn.Linear, list] = {m: [] for m in self.layers}
        for m in self.layers:
            m.forward = self._tapped_forward(m)

    def _tapped_forward(self, layer: nn.Linear):
        tape = self.tapes[layer]

        def forward(x: torch.Tensor) -> torch.Tensor:
            return _TappedLinear.apply(x, layer.weight, layer.bias, tape)
        return forward

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def cleanup(self) -> None:
        for m in self.layers:
            m.__dict__.pop("forward", None)
        self.clear()

    def clear(self) -> None:
        for tape in self.tapes.values():
            tape.clear()

    def clip_and_sum(self, max_grad_norm: float) -> None:
        """``p.grad`` = the sum over the batch's patients of each one's gradient clipped to
        ``max_grad_norm``: zero for an empty batch (the noise-only step), and zero for a layer
        the loss did not reach. Clears the tapes."""
        taped = {m: self._patients_first(m) for m in self.layers if self.tapes[m]}
        sizes = {a.shape[0] for a, _ in taped.values()}
        if len(sizes) > 1:
            raise ValueError("per-patient gradients need the patient dimension first in every Linear "
                             f"layer's input; the layers saw leading sizes {sorted(sizes)}")
        batch = sizes.pop() if sizes else 0
        squares = torch.zeros(batch)
        grams: dict = {}  # layers reading the same input (the surrogate's MLP and linear path) share its Gram
        for m, (a, g) in taped.items():
            squares = squares + _weight_sq_norms(a, g, grams)
            if m.bias is not None:
                squares = squares + g.sum(1).pow(2).sum(1)
        # The per-patient gradient is batch x its share of the mean loss (Opacus's "mean"); the
        # factor goes into the clip factor, so the tapes are never rescaled.
        norms = squares.sqrt() * batch
        factor = (max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0) * batch
        for m in self.layers:
            if m in taped and batch:
                a, g = taped[m]
                gc = g * factor[:, None, None]
                m.weight.grad = gc.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
                if m.bias is not None:
                    m.bias.grad = gc.sum((0, 1))
            else:
                m.weight.grad = torch.zeros_like(m.weight)
                if m.bias is not None:
                    m.bias.grad = torch.zeros_like(m.bias)
        self.clear()

    def _patients_first(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's inputs ``[B, n, in]`` and output gradients ``[B, n, out]`` over all its
        uses in the pass (each use's windows side by side)."""
        parts = []
        for x, g in self.tapes[layer]:
            if x.dim() < 2:
                raise ValueError("per-patient gradients need a batch of patients first in every Linear input")
            parts.append((x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])))
        if len(parts) == 1:
            return parts[0]
        if len({a.shape[0] for a, _ in parts}) > 1:
            raise ValueError("per-patient gradients need the patient dimension first in every Linear input")
        return torch.cat([a for a, _ in parts], 1), torch.cat([g for _, g in parts], 1)


def _weight_sq_norms(a: torch.Tensor, g: torch.Tensor, grams: dict) -> torch.Tensor:
    """``||G_b^T A_b||_F^2`` per patient ``b``, by whichever way costs fewer multiplications:
    the per-patient gradient itself (``n x in x out``) or its Gram form (``n^2 x (in + out)``,
    less the inputs' Gram when another layer already formed it; ``grams`` keeps those)."""
    n, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    key = (a.data_ptr(), tuple(a.shape), a.stride())
    known = key in grams
    if n * d_in * d_out <= n * n * (d_out + (0 if known else d_in)):
        return torch.linalg.vector_norm(torch.bmm(g.transpose(1, 2), a), dim=(1, 2)).square()
    if not known:
        grams[key] = torch.bmm(a, a.transpose(1, 2))
    return (grams[key] * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

"""A trained twin on disk and in memory: spec + plan + surrogate weights, and its forecasts.

A model directory holds ``spec.toml``, ``plan.json`` and ``weights.npz`` (plain arrays, no
pickle: a model file from another party cannot run code when loaded).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twinfed.errors import ModelError
from twinfed.models.plan import TrainingPlan
from twinfed.models.spec import TwinSpec, parse_spec
from twinfed.models.surrogate import build_surrogate, set_weights, weight_names
from twinfed.models.windows import Batch

MODEL_DIRNAME = "model"


@dataclass
class Twin:
    plan: TrainingPlan
    surrogate: torch.nn.Module

    @property
    def spec(self) -> TwinSpec:
        return self.plan.spec

    @classmethod
    def from_weights(cls, plan: TrainingPlan, weights: list[np.ndarray]) -> Twin:
        net = build_surrogate(plan.spec, plan.model, seed=plan.seed)
        set_weights(net, weights)
        net.eval()
        return cls(plan, net)

    @property
    def hybrid(self) -> bool:
        return self.plan.model.kind == "hybrid"

    @property
    def inputs(self):
        from twinfed.models.surrogate import inputs_for

        return inputs_for(self.spec, self.plan.model)

    def forecast(self, batch: Batch, *, offset: torch.Tensor | None = None, chunk: int = 8192) -> np.ndarray:
        """Forecast states ``[B, K, S]`` in the spec's units for windows gathered with
        ``with_context=self.inputs.with_context``; ``offset`` (hybrid only): each window's
        patient's identification (``twinfed.models.personalise``), added to the encoder's output."""
        inputs = self.inputs
        s = len(self.spec.states)
        out = []
        with torch.no_grad():
            for lo in range(0, len(batch), chunk):
                part = batch.part(slice(lo, lo + chunk))
                x = torch.from_numpy(inputs.batch_features(part))
                y = (self.surrogate(x) if offset is None else self.surrogate(x, offset[lo: lo + chunk])).numpy()
                if y.ndim == 3:  # an ensemble in training mode gives its structures': their mean
                    y = y.mean(axis=1)
                out.append(inputs.decode(part.history[:, -1, :s], y))
        pred = np.concatenate(out) if out else np.zeros((0, self.spec.horizon_steps, s))
        return self._clipped(pred)

    def _clipped(self, pred: np.ndarray) -> np.ndarray:
        lo = np.array([c.min for c in self.spec.states], np.float32)
        hi = np.array([c.max for c in self.spec.states], np.float32)
        return np.clip(pred, lo, hi)

    def structure_forecasts(self, batch: Batch, *, offset: torch.Tensor | None = None) -> np.ndarray | None:
        """Each core structure's forecast ``[B, M, K, S]`` of an ensemble twin (spec units; their
        mean is :meth:`forecast`), None for a twin of one structure or none."""
        if not self.hybrid or self.surrogate.n_structures < 2:
            return None
        model, s = self.surrogate, len(self.spec.states)
        with torch.no_grad():
            u = model.unpack(torch.from_numpy(self.inputs.batch_features(batch)))
            z = model.parameters_of(u)
            y = model.member_outputs(u, z if offset is None else z + offset, model.corrections(u)).numpy()
        m = y.shape[1]
        last = np.repeat(batch.history[:, -1, :s], m, axis=0)
        pred = self.inputs.decode(last, y.reshape(len(y) * m, -1))
        return self._clipped(pred.reshape(len(y), m, *pred.shape[1:]))

    def save(self, run_dir: str | Path) -> Path:
        target = Path(run_dir) / MODEL_DIRNAME
        target.mkdir(parents=True, exist_ok=True)
        names = weight_names(self.surrogate)
        arrays = {n: t.detach().cpu().numpy() for n, t in self.surrogate.state_dict().items()}
        with tempfile.NamedTemporaryFile(dir=target, suffix=".npz", delete=False) as fh:
            np.savez(fh, **{f"w{i:03d}": arrays[n] for i, n in enumerate(names)})
        os.replace(fh.name, target / "weights.npz")
        write_text_atomic(target / "spec.toml", self.spec.to_toml())
        write_text_atomic(target / "plan.json", self.plan.model_dump_json(indent=2))
        return target

    @classmethod
    def load(cls, run_dir: str | Path) -> Twin:
        run_dir = Path(run_dir)
        target = run_dir / MODEL_DIRNAME if (run_dir / MODEL_DIRNAME).is_dir() else run_dir
        for f in ("plan.json", "weights.npz"):
            if not (target / f).is_file():
                raise ModelError(f"{target}: no {f}; give the run directory that "
                                 "`twinfed simulate` wrote")
        try:
            plan = TrainingPlan.model_validate_json((target / "plan.json").read_text())
            with np.load(target / "weights.npz", allow_pickle=False) as npz:
                weights = [npz[k] for k in sorted(npz.files)]
            return cls.from_weights(plan, weights)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"{target}: model files are corrupt or do not match ({str(exc).splitlines()[0]}); "
                             "re-run the study") from None

    def check_spec(self, spec: TwinSpec) -> None:
        """Refuse data described by a spec whose columns or windows differ from the model's."""
        mine = self.spec
        for what in ("state_columns", "control_columns", "covariate_columns"):
            if getattr(mine, what) != getattr(spec, what):
                raise ModelError(f"the spec's {what.replace('_', ' ')} {getattr(spec, what)} differ "
                                 f"from the model's {getattr(mine, what)}; use the spec the model was "
                                 "trained with (model/spec.toml)")
        for what in ("step_minutes", "history_steps", "horizon_steps", "context_length"):
            if getattr(mine, what) != getattr(spec, what):
                raise ModelError(f"the spec's {what} ({getattr(spec, what)}) differs from the model's "
                                 f"({getattr(mine, what)}); use the spec the model was trained with")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(fh.name, path)


def load_spec_text(text: str) -> TwinSpec:
    return parse_spec(text, source="model spec")


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)

"""DeepSpeed ZeRO stage 1 or 2 as the training engine (``parallel.engine=deepspeed``).

DeepSpeed partitions optimizer state (ZeRO-1) and gradients (ZeRO-2) over data-parallel
ranks. Expert parameters must be partitioned and reduced over the *expert*-data-parallel
group instead, which DeepSpeed does for parameters it knows as expert parameters:

- each sharded expert weight is marked ``allreduce=False`` with ``group_name="ep_size_<ep>"``
  and the optimizer gets them in separate ``moe`` parameter groups
  (``split_params_into_different_moe_groups_for_optimizer``);
- DeepSpeed only wires its expert groups into ZeRO when the model contains one of its own
  ``MoE`` layers, so the model is wrapped with ``_ExpertGroups``, a compute-free
  ``deepspeed.moe.layer.MoE`` that creates those groups (``ep`` consecutive ranks, the
  same as our mesh's EP rows; checked) and nothing else.

The all-to-all itself stays ours (``AllToAllDispatcher``). Parameters stay fp32 (bf16
runs through autocast as in the torch engine). Checkpoints hold the single-process model
and optimizer state, gathered with ``deepspeed.utils.safe_get_full_optimizer_state``, so a
DeepSpeed run resumes under either engine at any layout.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_vlm.errors import ConfigError
from moe_vlm.parallel.engines import AmpContext, StepResult, finite, set_lr
from moe_vlm.parallel.expert_parallel import full_state_dict
from moe_vlm.parallel.parallelize import Parallelized
from moe_vlm.parallel.runtime import Layout
from moe_vlm.parallel.state import gather_expert_state, slice_expert_state

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class _Wrapped(nn.Module):
    """The model plus the marker DeepSpeed needs; forwards to the model."""

    def __init__(self, model: nn.Module, marker: Optional[nn.Module]):
        super().__init__()
        self.model = model
        if marker is not None:
            self.expert_groups = marker

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)


def _marker(ep: int, n_experts: int) -> nn.Module:
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    class _ExpertGroups(MoE):
        """Makes DeepSpeed treat the model as MoE; holds no weights, computes nothing."""

        def __init__(self) -> None:
            nn.Module.__init__(self)  # skip MoE's own experts and gate
            self.ep_size, self.num_experts = ep, n_experts
            self.expert_group_name = f"ep_size_{ep}"
            self.num_local_experts = n_experts // ep

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(
                    self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("_ExpertGroups is a marker for DeepSpeed; it is never called")

    return _ExpertGroups()


class DeepSpeedEngine:
    """The ``Engine`` interface over DeepSpeed, which reduces, clips and steps inside its
    own ``step`` (and skips a step whose gradient norm is not finite: checked after it)."""

    name = "deepspeed"

    def __init__(self, par: Parallelized, layout: Layout, groups: list[dict], lr: float,
                 betas: tuple[float, float], eps: float, grad_clip: float,
                 micro_batch_size: int, grad_accum: int, zero_stage: int):
        try:
            import deepspeed
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        except ImportError as e:
            raise ImportError("parallel.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' "
                              f"(or use parallel.engine=torch): {e}") from None
        model = par.model
        self.model, self.layout = model, layout
        deepspeed.init_distributed(dist_backend="nccl" if layout.device.type == "cuda" else "gloo")
        experts = par.expert_params
        group_name = f"ep_size_{layout.ep}"
        for p in experts:
            p.allreduce, p.group_name = False, group_name
        marker = None
        if experts:
            n_experts = next(m for m in model.modules() if hasattr(m, "first_expert")).n_experts
            marker = _marker(layout.ep, n_experts)
        self.wrapped = _Wrapped(model, marker)
        # The single-process parameter order (checkpoint indices), before DeepSpeed splits groups.
        self.params: list[nn.Parameter] = [p for g in groups for p in g["params"]]
        named = [{**g, "name": f"group_{i}"} for i, g in enumerate(groups)]
        ds_groups = split_params_into_different_moe_groups_for_optimizer(named) if experts else named
        optimizer = torch.optim.AdamW(ds_groups, lr=lr, betas=betas, eps=eps)
        self._defaults = dict(optimizer.defaults)
        self._groups = [(len(g["params"]), {k: v for k, v in g.items() if k != "params"})
                        for g in groups]
        config = {
            "train_batch_size": micro_batch_size * grad_accum * layout.world,
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True,
                                  "reduce_scatter": True, "overlap_comm": False},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.wrapped, optimizer=optimizer, config=config)
        if experts:
            from deepspeed.utils import groups as ds_groups_mod

            ds_ranks = dist.get_process_group_ranks(ds_groups_mod._get_expert_parallel_group(group_name))
            ours = dist.get_process_group_ranks(layout.ep_group)
            if ds_ranks != ours:
                raise RuntimeError(f"DeepSpeed's expert-parallel group {ds_ranks} differs from "
                                   f"the mesh's {ours}")

    def forward_backward(self, inputs: dict[str, Any], last: bool, amp: AmpContext) -> Any:
        """``out.loss`` is the micro-batch's share of the step loss already, so DeepSpeed's
        own 1/grad_accum scaling is off; it averages over ranks, so the share is scaled by
        the world size (as in ``TorchEngine``)."""
        with amp():
            out = self.engine(**inputs)
        self.engine.backward(out.loss * self.layout.world, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # only advances DeepSpeed's micro-step counter
        return out

    def step(self, lr: float, loss: Tensor) -> StepResult:
        """DeepSpeed's step: it measures the global norm, and skips the update (clearing
        the gradients) when the norm is not finite. A non-finite *loss* with finite
        gradients cannot happen (the gradients of a NaN loss are NaN); a DeepSpeed that
        updated with a non-finite norm is refused, since its weights are then lost."""
        set_lr(self.optimizer, lr)
        self.engine.step()
        raw = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if raw is None else float(raw))
        skipped = bool(getattr(self.engine.optimizer, "overflow", False))
        if not skipped and not finite(loss, norm):
            raise RuntimeError(
                f"DeepSpeed {_version()} applied a step with a non-finite loss or gradient "
                "norm instead of skipping it; use a DeepSpeed that skips them (0.19.8 does) or "
                "parallel.engine=torch")
        return StepResult(norm, skipped)

    def model_state(self) -> dict[str, Tensor]:
        return full_state_dict(self.model, 0)

    def _step_count(self) -> Optional[Tensor]:
        for st in self.engine.optimizer.optimizer.state.values():
            if "step" in st:
                return st["step"]
        return None

    def optimizer_state(self) -> dict[str, Any]:
        """The single-process AdamW state dict (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        steps = self._step_count()
        state: dict[int, dict[str, Any]] = {}
        if steps is not None:  # before the first step there is no state
            self._relink()
            for i, p in enumerate(self.params):
                state[i] = {"step": steps.detach().clone().cpu().float(), **{
                    k: safe_get_full_optimizer_state(p, k) for k in _ADAM_KEYS}}
        return {"state": gather_expert_state(self.model, self.params, state, 0),
                "param_groups": self._torch_groups()}

    def _relink(self) -> None:
        """Point each parameter's fragment map at the optimizer's current state tensors.
        Uses ZeRO-1/2 internals (present from DeepSpeed 0.15 through 0.19, checked)."""
        zero = self.engine.optimizer
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _torch_groups(self) -> list[dict]:
        """Param groups as the single-process AdamW has them (indices into ``self.params``)."""
        first = self.optimizer.param_groups[0]
        lr = first["lr"] / first.get("lr_scale", 1.0)  # the step's base rate (set_lr)
        out, start = [], 0
        for n, opts in self._groups:
            out.append({**self._defaults, **opts, "lr": lr * opts.get("lr_scale", 1.0),
                        "params": list(range(start, start + n))})
            start += n
        return out

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Put a single-process AdamW state into DeepSpeed's partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        n_saved = sum(len(g["params"]) for g in state["param_groups"])
        if n_saved != len(self.params):
            raise ConfigError(f"train.trainable: the checkpoint's optimizer has {n_saved} parameters, "
                              f"this run's {len(self.params)}; train.trainable must match the run "
                              "that saved it (start a new run.dir with train.init_from to change it)")
        saved = slice_expert_state(self.model, self.params, state["state"])
        if not saved:
            return
        base = self.engine.optimizer.optimizer
        step = next(iter(saved.values()))["step"]
        for group in base.param_groups:  # materialise AdamW's lazily created state
            for flat in group["params"]:
                st = base.state[flat]
                st["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
                for k in _ADAM_KEYS:
                    st.setdefault(k, torch.zeros_like(flat))
        self._relink()
        for i, p in enumerate(self.params):
            for k in _ADAM_KEYS:
                safe_set_full_optimizer_state(p, saved[i][k].to(p.device), k)


def _version() -> str:
    import deepspeed

    return deepspeed.__version__

"""Liger-Kernel's fused-linear DPO and JSD losses (`liger_kernel.chunked_loss`).

They compute the gradients inside the forward (``torch.func.grad_and_value`` per chunk) and only scale
them in backward, so their "backward" time is near zero and forward carries both: compare fwd+bwd.
Their chunk loop is ``torch.compile``d by default; that is kept on CUDA and turned off on CPU, where
inductor would compile for minutes per shape.
"""
from typing import Optional

import torch

from ..heads import HeadSpec
from ..workloads import DPO_BETA, IGNORE_INDEX, JSD_BETA, CaseInputs, Workload
from .base import LossFn, Provider, module_missing


class LigerProvider(Provider):
    name = "liger"
    description = "Liger-Kernel LigerFusedLinearDPOLoss / LigerFusedLinearJSDLoss"
    supports_softcap = False

    def unsupported(self, workload: Workload, head: HeadSpec, device: torch.device) -> Optional[str]:
        missing = module_missing("liger_kernel.chunked_loss")
        if missing:
            return missing
        if workload.name not in ("dpo", "jsd"):
            return f"has no fused-linear loss for the {workload.name!r} workload"
        if head.softcap is not None:
            return "no logit softcap"
        return None

    def build(self, workload: Workload, inputs: CaseInputs) -> LossFn:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearJSDLoss

        compiled = inputs.hidden.device.type == "cuda"
        if workload.name == "dpo":
            # chunk_size counts chosen/rejected pairs per chunk; 1 is Liger's default.
            loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=DPO_BETA, compiled=compiled,
                                              use_ref_model=True, average_log_prob=False, loss_type="sigmoid")

            def step() -> torch.Tensor:
                return loss_fn(inputs.weight, inputs.hidden, inputs.labels, None,
                               inputs.ref_hidden, inputs.ref_weight, None)[0]
            return step

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=JSD_BETA,
                                          ignore_index=IGNORE_INDEX, compiled=compiled)
        hidden_size = inputs.hidden.shape[-1]

        def step() -> torch.Tensor:
            return loss_fn(inputs.hidden.reshape(-1, hidden_size), inputs.weight,
                           inputs.ref_hidden.reshape(-1, inputs.ref_hidden.shape[-1]), inputs.ref_weight,
                           inputs.labels.reshape(-1))
        return step

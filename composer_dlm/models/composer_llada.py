"""ComposerModel for masked-diffusion training: noise the batch, run the LLaDA trunk, score masked tokens.

The loss is computed inside ``LLaDAModel.forward`` (through its ``head`` argument), so under FSDP the output
projection is gathered while it is used, and with ``loss_impl='fused'`` the (tokens x vocabulary) logits are
never formed: the fused kernel scores only the masked rows.

Training noise of each sequence is drawn from a generator seeded by (seed, batch, row of the sequence in the
global batch); the random truncation length by (seed, batch). Training noise is therefore a function of the
trainer's timestamp, which Composer checkpoints, and not of how the batch is split into micro-batches or
over processes: a resumed run draws exactly the noise of the uninterrupted run even when
``device_train_microbatch_size: auto`` picks another split (or an out-of-memory retry does). Evaluation noise is seeded by (eval_seed, batch
contents), so it is the same for the same data in every run and at every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torchmetrics import Metric

from composer_dlm.diffusion import (
    DiffusionConfig,
    elbo_denominator,
    forward_process,
    loss_weights,
    random_truncation_length,
)
from composer_dlm.models.architectures import AnyModel
from composer_dlm.models.llada import eager_blocks
from kernels import DEFAULT_CONFIG, masked_linear_cross_entropy

LossImpl = Literal["fused", "plain"]


@dataclasses.dataclass
class DiffusionOutputs:
    """What one forward returns: the loss and the sums that metrics need (all device tensors, no host sync)."""

    loss: torch.Tensor
    ce_sum: torch.Tensor
    correct_sum: torch.Tensor
    num_masked: torch.Tensor
    elbo_sum: torch.Tensor
    elbo_tokens: torch.Tensor


class _SumRatio(Metric):
    """sum(numerator) / sum(denominator) over batches and ranks; without a denominator, the mean per batch."""

    full_state_update = False
    num: torch.Tensor  # states registered by add_state
    den: torch.Tensor

    def __init__(self, numerator: str, denominator: str | None) -> None:
        super().__init__()
        self.numerator, self.denominator = numerator, denominator
        self.add_state("num", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("den", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: DiffusionOutputs) -> None:
        self.num += getattr(outputs, self.numerator).detach().to(torch.float64)
        self.den += (
            1.0 if self.denominator is None else getattr(outputs, self.denominator).detach().to(torch.float64)
        )

    def compute(self) -> torch.Tensor:
        return (self.num / self.den.clamp_min(1.0)).float()


class DiffusionLoss(_SumRatio):
    """Mean training objective over batches."""

    def __init__(self) -> None:
        super().__init__("loss", None)


class MaskedCrossEntropy(_SumRatio):
    """Cross-entropy per masked token (nats), without the 1/p_mask weighting."""

    def __init__(self) -> None:
        super().__init__("ce_sum", "num_masked")


class MaskedAccuracy(_SumRatio):
    """Fraction of masked tokens whose argmax prediction is the original token."""

    def __init__(self) -> None:
        super().__init__("correct_sum", "num_masked")


class DiffusionELBO(_SumRatio):
    """The masked-diffusion bound on negative log-likelihood, nats per token (per answer token in SFT)."""

    def __init__(self) -> None:
        super().__init__("elbo_sum", "elbo_tokens")


def _metrics() -> dict[str, Metric]:
    return {
        "DiffusionLoss": DiffusionLoss(),
        "MaskedCrossEntropy": MaskedCrossEntropy(),
        "MaskedAccuracy": MaskedAccuracy(),
        "ELBO": DiffusionELBO(),
    }


# The attributes under which FSDP1 and the activation-checkpoint wrapper hold the module they wrap (and torch.compile
# under ``_orig_mod``): segments of the parameter names of wrapped modules.
WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_SEGMENTS = tuple(f"{name}." for name in (*WRAPPER_ATTRS, "_orig_mod"))


def llada_weights(composer_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaDA parameter names from a :class:`ComposerLLaDA` state dict, whose keys are ``model.`` + the
    LLaDAModel's own (``model.model.transformer.wte.weight``); wrapper segments are dropped, other keys skipped."""
    out = {}
    for key, tensor in composer_state.items():
        for segment in _WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        if key.startswith("model."):
            out[key.removeprefix("model.")] = tensor
    return out


class ComposerLLaDA(ComposerModel):
    """Masked-diffusion objective around a :class:`LLaDAModel` (kept as the single child ``self.model``)."""

    def __init__(
        self,
        model: AnyModel,
        diffusion: DiffusionConfig,
        *,
        mask_token_id: int | None = None,
        loss_impl: LossImpl = "fused",
        loss_chunk_mib: int | None = None,
        seed: int = 17,
    ) -> None:
        super().__init__()
        if loss_impl not in ("fused", "plain"):
            raise ValueError(f"loss_impl must be 'fused' or 'plain', got {loss_impl!r}")
        self.model = model
        self.diffusion = diffusion
        mask = model.config.mask_token_id if mask_token_id is None else mask_token_id
        if mask is None:
            raise ValueError("the model's config has no mask_token_id: pass mask_token_id (the tokenizer's)")
        self.mask_token_id: int = mask
        self.loss_impl = loss_impl
        # The fused loss's launch settings: the kernel's defaults, with the buffer budget the YAML may set.
        self.loss_kernel = (
            DEFAULT_CONFIG
            if loss_chunk_mib is None
            else dataclasses.replace(DEFAULT_CONFIG, chunk_bytes=loss_chunk_mib << 20)
        )
        self.seed = seed
        self.train_metrics = _metrics()
        self.val_metrics = _metrics()
        # The noise clock: the trainer's batch index (set by NoiseClock before each batch and each retry of it)
        # and the global-batch row of the next sequence to noise.
        self.noise_step = 0
        self.noise_row = 0

    # --- noise ----------------------------------------------------------------------------------------------
    def set_noise_step(self, step: int, first_row: int = 0) -> None:
        """Starts the noise of batch ``step``, whose first row on this process is row ``first_row`` of the
        global batch (rank x rows per process)."""
        self.noise_step, self.noise_row = step, first_row

    def train_noise(
        self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward_process`` of the next ``B`` rows of the current batch, global row ``r`` from its own
        generator seeded by (seed, batch, r): the batch draws the same noise however it is split into
        micro-batches or processes. Advances the row counter."""
        rows = []
        for i in range(input_ids.shape[0]):
            seed = hash((self.seed, self.noise_step, self.noise_row + i)) % (2**62)
            row_prompt = None if prompt_lengths is None else prompt_lengths[i : i + 1]
            rows.append(self._noise(input_ids[i : i + 1], row_prompt, seed))
        self.noise_row += input_ids.shape[0]
        noisy, masked, p_mask = (torch.cat(parts) for parts in zip(*rows, strict=True))
        return noisy, masked, p_mask

    def _eval_noise(
        self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device, dtype=torch.float64)
        fingerprint = int((input_ids.to(torch.float64) * positions).sum().item()) % (2**31)
        seed = hash((self.diffusion.eval_seed, fingerprint, tuple(input_ids.shape))) % (2**62)
        return self._noise(input_ids, prompt_lengths, seed)

    def _noise(
        self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward_process`` of ``input_ids`` with a generator on their device seeded with ``seed``."""
        return forward_process(
            input_ids,
            mask_token_id=self.mask_token_id,
            eps=self.diffusion.eps,
            prompt_lengths=prompt_lengths,
            generator=torch.Generator(device=input_ids.device).manual_seed(seed),
        )

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> DiffusionOutputs:
        input_ids = batch["input_ids"]
        prompt_lengths = self._prompt_lengths(batch)
        if prompt_lengths is None and self.diffusion.random_length_prob > 0:
            length = random_truncation_length(
                input_ids.shape[1], self.diffusion.random_length_prob, seed=self.seed, step=self.noise_step
            )
            input_ids = input_ids[:, :length]
        return self._score(input_ids, prompt_lengths, self.train_noise(input_ids, prompt_lengths))

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> DiffusionOutputs:
        if outputs is not None:
            return outputs
        input_ids, prompt_lengths = batch["input_ids"], self._prompt_lengths(batch)
        with eager_blocks():
            return self._score(input_ids, prompt_lengths, self._eval_noise(input_ids, prompt_lengths))

    def _prompt_lengths(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.diffusion.mode == "pretrain":
            return None
        if "prompt_lengths" not in batch:
            raise ValueError("diffusion.mode is 'sft' but the batch has no 'prompt_lengths'; use SFT shards")
        return batch["prompt_lengths"]

    def _score(
        self,
        input_ids: torch.Tensor,
        prompt_lengths: torch.Tensor | None,
        noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> DiffusionOutputs:
        noisy, masked, p_mask = noise
        weights_N = loss_weights(masked, p_mask, prompt_lengths).reshape(-1)
        targets_N = input_ids.reshape(-1)

        def head(hidden_BLH: torch.Tensor, weight_VH: torch.Tensor) -> tuple[torch.Tensor, ...]:
            hidden_NH = hidden_BLH.reshape(-1, hidden_BLH.shape[-1])
            if self.loss_impl == "fused":
                return masked_linear_cross_entropy(
                    hidden_NH, weight_VH, targets_N, weights_N, return_stats=True, config=self.loss_kernel
                )
            logits_NV = F.linear(hidden_NH, weight_VH).float()
            ce_N = F.cross_entropy(logits_NV, targets_N, reduction="none")
            correct_N = logits_NV.argmax(-1) == targets_N
            return (ce_N * weights_N).sum(), ce_N.detach(), correct_N

        loss, ce_N, correct_N = self.model(noisy, head=head)
        # A mixture of experts leaves its weighted router losses (load balance, z-loss) from this forward.
        router_loss = getattr(self.model, "router_loss", None)
        if router_loss is not None:
            loss = loss + router_loss
        masked_N = masked.reshape(-1)
        ce_masked = torch.where(masked_N, ce_N.float(), 0.0)
        tokens = elbo_denominator(masked, prompt_lengths)
        # Sum over masked tokens of CE / p_mask: the loss rescaled from its normalisation to a plain sum.
        elbo_sum = (ce_masked / p_mask.reshape(-1)).sum()
        return DiffusionOutputs(
            loss=loss,
            ce_sum=ce_masked.sum(),
            correct_sum=(correct_N & masked_N).sum().float(),
            num_masked=masked_N.sum().float(),
            elbo_sum=elbo_sum,
            elbo_tokens=tokens,
        )

    def loss(self, outputs: DiffusionOutputs, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return outputs.loss

    # --- metrics --------------------------------------------------------------------------------------------
    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch: Any, outputs: DiffusionOutputs, metric: Metric) -> None:
        metric.update(outputs)

    # --- throughput -----------------------------------------------------------------------------------------
    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs of a batch for Composer's SpeedMonitor (MFU); see ``LLaDAConfig.training_flops``."""
        b, length = batch["input_ids"].shape
        return self.model.config.training_flops(b, length)

"""Collators: stack pretraining sequences; right-pad SFT samples with EOS (LLaDA's recipe)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def collate_pretrain(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"input_ids": (B, L)} from samples of equal length L."""
    return {"input_ids": torch.stack([s["input_ids"] for s in samples])}


@dataclass(frozen=True)
class SFTCollator:
    """Right-pads each sample with EOS to the longest in the batch, or to `pad_to_length` if set.

    In LLaDA's SFT the padding EOS tokens belong to the answer: they are noised and scored, so the
    answer length of row b is L - prompt_lengths[b]. Returns {"input_ids": (B, L) int64,
    "prompt_lengths": (B,) int64}.
    """

    eos_token_id: int
    pad_to_length: int | None = None

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [len(s["input_ids"]) for s in samples]
        length_L = self.pad_to_length if self.pad_to_length is not None else max(lengths)
        if max(lengths) > length_L:
            raise ValueError(f"a sample of {max(lengths)} tokens does not fit pad_to_length {length_L}")
        input_ids_BL = torch.full((len(samples), length_L), self.eos_token_id, dtype=torch.long)
        for row, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
            input_ids_BL[row, :n] = sample["input_ids"]
        prompt_lengths_B = torch.tensor([int(s["prompt_length"]) for s in samples], dtype=torch.long)
        return {"input_ids": input_ids_BL, "prompt_lengths": prompt_lengths_B}

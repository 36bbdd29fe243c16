"""Prompt conditioning: A1111-style weights and prompts longer than CLIP's 77 tokens.

Syntax (A1111's): `(words)` multiplies attention by 1.1, `[words]` divides by
1.1, `(words:1.3)` sets 1.3; they nest and multiply. `\\(` `\\)` `\\[` `\\]`
are literal brackets. Tokens are encoded in chunks of 75 (plus BOS and EOS,
padded to 77) whose hidden states are concatenated, as A1111 and ComfyUI do,
so nothing past token 77 is cut. Weighted hidden states are rescaled to keep
their original mean (A1111's rule). A plain prompt of up to 75 tokens gives
exactly what diffusers' own `encode_prompt` gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..prompt_syntax import parse_weighted

CHUNK = 75


def tokenize_weighted(tokenizer: Any, text: str) -> tuple[list[int], list[float]]:
    """Token ids (no BOS/EOS) and one weight per token."""
    ids: list[int] = []
    weights: list[float] = []
    for fragment, weight in parse_weighted(text):
        fragment_ids = tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids += fragment_ids
        weights += [weight] * len(fragment_ids)
    return ids, weights


def _unchanged(text: str) -> str:
    return text


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for the prompt and the negative prompt."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor
    negative_pooled: torch.Tensor

    @classmethod
    def stacked(cls, parts: list[Conditioning], counts: list[int]) -> Conditioning:
        """One batch of several prompts' conditioning, prompt i repeated `counts[i]` times (once per image),
        as diffusers repeats one prompt for `num_images_per_prompt`. Every part must have as many chunks."""

        def stack(name: str) -> torch.Tensor:
            return torch.cat([getattr(part, name).repeat_interleave(count, dim=0)
                              for part, count in zip(parts, counts, strict=True)])  # fmt: skip

        return cls(stack("embeds"), stack("pooled"), stack("negative_embeds"), stack("negative_pooled"))

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": self.embeds,
            "pooled_prompt_embeds": self.pooled,
            "negative_prompt_embeds": self.negative_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled,
        }


class PromptEncoder:
    """Encodes prompts with one or two CLIP encoders the way SDXL expects.

    Args:
        tokenizers: one tokenizer per encoder.
        encoders: CLIP text encoders; the last one gives the pooled embedding.
    """

    def __init__(self, tokenizers: list[Any], encoders: list[Any]) -> None:
        self.tokenizers = tokenizers
        self.encoders = encoders
        # What a prompt becomes before tokenizing: embeddings' names written out as their vector tokens while a
        # run has embeddings (engine/embedding_vectors.py), else the text itself.
        self.expand: Callable[[str], str] = _unchanged

    def _chunks(
        self, tokenizer: Any, ids: list[int], weights: list[float], count: int
    ) -> list[tuple[list[int], list[float]]]:
        chunks = []
        for index in range(count):
            part = ids[index * CHUNK : (index + 1) * CHUNK]
            part_weights = weights[index * CHUNK : (index + 1) * CHUNK]
            padding = CHUNK - len(part)
            chunk_ids = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
            chunks.append((chunk_ids, [1.0, *part_weights, 1.0] + [1.0] * padding))
        return chunks

    @torch.no_grad()
    def _encode_one(
        self, text: str, count: int, clip_skip: int, check: Callable[[], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (1, 77*count, sum of widths) and pooled embedding of the last encoder.

        `clip_skip` 1 takes the penultimate layer (SDXL's own), each more one layer earlier, in every
        encoder, as diffusers' `clip_skip=clip_skip - 1` does; the pooled embedding is unchanged.
        """
        per_encoder = []
        pooled = torch.empty(0)
        text = self.expand(text)
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids, weights = tokenize_weighted(tokenizer, text)
            states = []
            for chunk_index, (chunk_ids, chunk_weights) in enumerate(self._chunks(tokenizer, ids, weights, count)):
                if check is not None:
                    check()  # a long prompt is many encoder passes: a cancel is honoured between them
                output = encoder(torch.tensor([chunk_ids], device=encoder.device), output_hidden_states=True)
                hidden = output.hidden_states[-(clip_skip + 1)]
                if any(w != 1.0 for w in chunk_weights):
                    scale = torch.tensor(chunk_weights, device=hidden.device, dtype=hidden.dtype)
                    original_mean = hidden.mean()
                    hidden = hidden * scale[None, :, None]
                    hidden = hidden * (original_mean / hidden.mean())
                states.append(hidden)
                if chunk_index == 0:
                    pooled = output[0]
            per_encoder.append(torch.cat(states, dim=1))
        return torch.cat(per_encoder, dim=-1), pooled

    def chunk_count(self, text: str) -> int:
        """Chunks of 75 tokens the longest tokenization of `text` needs (at least 1)."""
        text = self.expand(text)
        longest = max(len(tokenize_weighted(tokenizer, text)[0]) for tokenizer in self.tokenizers)
        return max(1, math.ceil(longest / CHUNK))

    def encode(
        self,
        prompt: str,
        negative_prompt: str,
        zero_empty_negative: bool,
        dtype: torch.dtype,
        clip_skip: int = 1,
        check: Callable[[], None] | None = None,
    ) -> Conditioning:
        """Encode a prompt pair; both sides get the same number of chunks.

        Args:
            zero_empty_negative: an empty negative prompt becomes zeros (SDXL base's
                `force_zeros_for_empty_prompt`) instead of the encoding of "".
            clip_skip: which layer from the end conditions the UNet (1: the penultimate, SDXL's own).
            check: called before every 77-token encoder pass (raises to stop, e.g. on cancel).
        """
        count = max(self.chunk_count(prompt), self.chunk_count(negative_prompt))
        embeds, pooled = self._encode_one(prompt, count, clip_skip, check)
        if zero_empty_negative and not negative_prompt:
            negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = self._encode_one(negative_prompt, count, clip_skip, check)
        return Conditioning(embeds.to(dtype), pooled.to(dtype), negative_embeds.to(dtype), negative_pooled.to(dtype))

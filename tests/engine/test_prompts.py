"""Prompt weighting syntax and prompts longer than 77 tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from sdxl_refinery import ImageService
from sdxl_refinery.engine.prompts import CHUNK, PromptEncoder
from sdxl_refinery.prompt_syntax import parse_weighted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
        ("a [cat]", [("a ", 1.0), ("cat", pytest.approx(1 / 1.1))]),
        ("a (cat:1.5) dog", [("a ", 1.0), ("cat", 1.5), (" dog", 1.0)]),
        ("((cat))", [("cat", pytest.approx(1.21))]),
        ("(red (cat:2))", [("red ", 1.1), ("cat", pytest.approx(2.2))]),
        (r"a \(literal\) cat", [("a (literal) cat", 1.0)]),
        ("(a:b cat)", [("a:b cat", 1.1)]),
        ("(unclosed cat", [("unclosed cat", 1.1)]),
        ("stray ) bracket", [("stray ) bracket", 1.0)]),
    ],
)
def test_parse_weighted(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_weighted(text) == expected


@pytest.fixture(scope="module")
def encoder(service: ImageService) -> PromptEncoder:
    asyncio.run(service.load())
    return service._engine.runner.base_prompts  # type: ignore[union-attr]


def test_long_prompt_is_encoded_in_chunks_not_cut(encoder: PromptEncoder) -> None:
    # The tiny tokenizer is character-level: one token per character, spaces split words.
    words = "abcdefgh " * 20  # 160 tokens: chunks of 75, 75 and 10
    assert encoder.chunk_count(words) == 3
    long = encoder.encode(words, "", True, torch.float32)
    assert long.embeds.shape[1] == 3 * 77
    changed = encoder.encode(words[:-9] + "zzzzzzzz", "", True, torch.float32)  # tokens 152..159
    # Only the last chunk (tokens 151+) differs: text past token 77 reaches the UNet.
    assert torch.equal(long.embeds[:, :154], changed.embeds[:, :154])
    assert not torch.allclose(long.embeds[:, 154:], changed.embeds[:, 154:])
    assert long.negative_embeds.shape == long.embeds.shape  # the negative side is padded to the same length


def test_weight_moves_the_conditioning_the_way_asked(encoder: PromptEncoder) -> None:
    def word_share(text: str) -> float:
        hidden = encoder.encode(text, "", True, torch.float32).embeds[0]
        norms = hidden.norm(dim=-1)
        return float(norms[4:8].sum() / norms[1:4].sum())  # "cat!" (tokens 4..7) against "the" (1..3)

    plain = word_share("the cat!")
    assert word_share("the (cat!:1.5)") > plain > word_share("the (cat!:0.5)")
    assert word_share("the [cat!]") < plain


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_plain_short_prompt_matches_diffusers_encode_prompt(
    service: ImageService, encoder: PromptEncoder, clip_skip: int
) -> None:
    base = service._engine.pair.base  # type: ignore[union-attr]
    ours = encoder.encode("a small house", "ugly", True, torch.float32, clip_skip)
    # diffusers counts clip skip from the penultimate layer: its clip_skip=1 is A1111's Clip skip 2.
    diffusers_skip = clip_skip - 1 or None
    embeds, negative, pooled, negative_pooled = base.encode_prompt(
        "a small house", negative_prompt="ugly", clip_skip=diffusers_skip
    )
    assert torch.equal(ours.embeds, embeds)
    assert torch.equal(ours.pooled, pooled) and torch.equal(ours.negative_pooled, negative_pooled)
    if clip_skip == 1:
        assert torch.equal(ours.negative_embeds, negative)
    else:  # diffusers skips on the prompt side only; A1111 and ComfyUI (and we) skip on both sides
        assert torch.equal(ours.negative_embeds, encoder.encode("ugly", "", True, torch.float32, clip_skip).embeds)
        assert not torch.equal(ours.negative_embeds, negative)
    assert CHUNK == 75


def test_a_long_prompt_checks_for_cancel_between_encoder_passes(encoder: PromptEncoder) -> None:
    calls: list[int] = []

    def cancel_at_the_third() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        encoder.encode("abcdefgh " * 40, "", True, torch.float32, check=cancel_at_the_third)  # 5 chunks a side
    assert len(calls) == 3  # stopped at the third pass, not after all of them

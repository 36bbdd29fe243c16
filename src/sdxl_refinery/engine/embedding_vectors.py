"""Textual-inversion embeddings in the engine, for one run: what diffusers' `load_textual_inversion` does to
each text encoder, undone when the run ends.

For each embedding the run's prompts use, the tokenizers learn new tokens (`name`, then `name_1`, ... for
further vectors, as diffusers names them) and each text encoder's token table gains their vectors: `clip_l`
for CLIP ViT-L, `clip_g` for OpenCLIP ViT-bigG (the base's second encoder and the refiner's, which see the
embedding too). A prompt's `name` is written out as `name name_1 ...` before it is tokenized. The tokenizers
are copies made for the run and the encoders' original token tables are put back afterwards, so a run
without embeddings computes what it did before any was used.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken

from ..embeddings import EmbeddingFile
from .prompts import PromptEncoder


class EmbeddingMismatch(ValueError):
    """An embedding's vectors do not fit a text encoder (made for another model family)."""


def vector_tokens(name: str, count: int) -> list[str]:
    """The tokens of an embedding's vectors: `name`, `name_1`, ..., `name_{count-1}` (diffusers' names)."""
    return [name] + [f"{name}_{index}" for index in range(1, count)]


def expand_vectors(text: str, embeddings: list[EmbeddingFile]) -> str:
    """`text` with each embedding's name written out as all its vector tokens."""
    for embedding in embeddings:
        if embedding.vectors > 1:
            pattern = rf"(?<![\w/.-]){re.escape(embedding.name)}(?![\w/.-])"
            text = re.sub(pattern, " ".join(vector_tokens(embedding.name, embedding.vectors)), text)
    return text


def _part(encoder: Any) -> str:
    """Which of an embedding's tensors an encoder takes: `clip_g` for the projection model (OpenCLIP bigG)."""
    return "clip_g" if "WithProjection" in type(encoder).__name__ else "clip_l"


def _extended_table(encoder: Any, tokenizer: Any, embeddings: list[EmbeddingFile],
                    vectors: dict[str, dict[str, torch.Tensor]]) -> torch.nn.Embedding:  # fmt: skip
    """The encoder's token table with the embeddings' vectors at the ids `tokenizer` gives their tokens."""
    table = encoder.get_input_embeddings()
    part = _part(encoder)
    ids, rows = [], []
    for embedding in embeddings:
        values = vectors[embedding.name][part]
        if values.shape[-1] != table.embedding_dim:
            raise EmbeddingMismatch(f"embedding {embedding.name}: {part} is {values.shape[-1]} wide; this model's text "
                             f"encoder takes {table.embedding_dim}")  # fmt: skip
        ids += tokenizer.convert_tokens_to_ids(vector_tokens(embedding.name, embedding.vectors))
        rows += list(values)
    grown = torch.nn.Embedding(max(table.num_embeddings, max(ids) + 1), table.embedding_dim,
                               device=table.weight.device, dtype=table.weight.dtype)  # fmt: skip
    with torch.no_grad():
        grown.weight[: table.num_embeddings] = table.weight
        for token_id, row in zip(ids, rows, strict=True):
            grown.weight[token_id] = row.to(grown.weight)
    return grown


@contextlib.contextmanager
def embeddings_applied(prompt_encoders: list[PromptEncoder], embeddings: list[EmbeddingFile]) -> Iterator[None]:
    """For the length of a run: the embeddings' tokens in copies of the prompt encoders' tokenizers and their
    vectors in the text encoders' token tables; everything as it was afterwards.

    Raises:
        EmbeddingMismatch: an embedding's vectors do not fit a text encoder's width (another model family).
    """
    if not embeddings:
        yield
        return
    vectors = {embedding.name: load_file(str(embedding.path), device="cpu") for embedding in embeddings}
    tokens = [AddedToken(token, single_word=True, normalized=False)
              for embedding in embeddings for token in vector_tokens(embedding.name, embedding.vectors)]  # fmt: skip
    copies: dict[int, Any] = {}  # each tokenizer once (the refiner shares the base's second one)
    tables: dict[int, tuple[Any, Any]] = {}  # each encoder once: (encoder, its own table)
    originals = [(prompts, list(prompts.tokenizers), prompts.expand) for prompts in prompt_encoders]
    try:
        for prompts in prompt_encoders:
            for tokenizer, encoder in zip(prompts.tokenizers, prompts.encoders, strict=True):
                if id(tokenizer) not in copies:
                    copies[id(tokenizer)] = copy.deepcopy(tokenizer)
                    copies[id(tokenizer)].add_tokens(tokens)
                if id(encoder) not in tables:
                    grown = _extended_table(encoder, copies[id(tokenizer)], embeddings, vectors)
                    tables[id(encoder)] = (encoder, encoder.get_input_embeddings())
                    encoder.set_input_embeddings(grown)
        for prompts in prompt_encoders:
            prompts.tokenizers = [copies[id(tokenizer)] for tokenizer in prompts.tokenizers]
            prompts.expand = functools.partial(expand_vectors, embeddings=embeddings)
        yield
    finally:
        for prompts, tokenizers, expand in originals:
            prompts.tokenizers, prompts.expand = tokenizers, expand
        for encoder, table in tables.values():
            encoder.set_input_embeddings(table)

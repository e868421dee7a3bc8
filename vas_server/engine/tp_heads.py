"""Token heads on a vocabulary-parallel embedding (the shared path under tensor parallelism).

Under TP the base's embedding is a vLLM `VocabParallelEmbedding`: rank r holds rows
[org_vocab_start_index, org_vocab_end_index) of the vocabulary (plus padding, and a range of added
tokens for LoRA vocabularies), at local offsets. The trunk state `h` is replicated on every rank
(the residual stream after a layer is), and so are the candidates (every rank samples from the
same all-gathered logits) and the heads' small tensors (P, bias, baseline).

`Q(s)[a] = c . h + (P h) . E[a] + bias[a]` (vas_server.core.heads.TokenHeads): only `(P h) . E[a]`
needs E, and TokenHeads asks its Embedding for exactly that: `VocabShard` is that Embedding here.
Each rank computes it for the candidates in its own shard, 0 for the others (a mask, no host
sync), and one all-reduce (sum) of the [n_token, B, K] values gives every rank every value. Each
candidate's dot product is computed on exactly one rank with the same operands as on one device,
and the other ranks add exact zeros, so the values equal the single-device ones. The [B*K, H]
embedding rows are never gathered: the all-reduce moves n_token * B * K numbers.
"""

from __future__ import annotations

import torch

from vas_server.core.heads import DenseEmbedding


def shard_local_ids(tokens: torch.Tensor, shard) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (global ids) -> (local row ids, in-shard mask) for a VocabParallelEmbedding's
    `shard_indices`. Out-of-shard tokens get local id 0 (a valid row; their value is masked)."""
    org = (tokens >= shard.org_vocab_start_index) & (tokens < shard.org_vocab_end_index)
    added = (tokens >= shard.added_vocab_start_index) & (tokens < shard.added_vocab_end_index)
    # vLLM's layout: the shard's original rows, its padding, then its added rows.
    added_offset = (shard.added_vocab_start_index - (shard.org_vocab_end_index - shard.org_vocab_start_index)
                    - shard.num_org_vocab_padding)
    offset = shard.org_vocab_start_index * org + added_offset * added
    in_shard = org | added
    return in_shard * (tokens - offset), in_shard


class VocabShard:
    """This rank's shard of a VocabParallelEmbedding, as token heads' Embedding
    (vas_server.core.heads): the dot products of the candidates in the shard, 0 for the others,
    summed over the TP group by `all_reduce`."""

    def __init__(self, embedding, all_reduce):
        self.embedding = embedding
        self.all_reduce = all_reduce
        self.rows = DenseEmbedding(embedding.weight, reuse_rows=True)  # indexed by local ids

    def dots(self, projected: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        local, in_shard = shard_local_ids(tokens, self.embedding.shard_indices)
        dots = torch.where(in_shard, self.rows.dots(projected, local), 0.0)
        return self.all_reduce(dots.contiguous())

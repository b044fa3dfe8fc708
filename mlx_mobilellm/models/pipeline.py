"""Pipeline-parallel inference over mx.distributed: a model too large for one machine is cut
into consecutive slices of blocks, one slice per rank (process) of the group.

Rank 0 embeds the tokens and runs the first blocks, sends the hidden states to rank 1, which
runs the next blocks, and so on; the last rank's output (only the positions whose logits are
asked for: one per row when decoding) is then gathered by every rank, and each computes the
same logits from it. So every rank runs the same decode loop on the same tokens, and the
caller's code does not change. Sharing hidden states rather than logits or tokens keeps what
crosses the links small (embed_dim values a row, not vocab_size) and leaves sampling, stop
conditions and logits processors where they are, on every rank alike.

A rank keeps only its own blocks: the others' weights are dropped from the model before they
are read (MLX loads lazily), so each machine holds its share of the blocks plus the embedding
(the head, tied or not, runs on every rank).
"""

from __future__ import annotations

import mlx.core as mx


def block_ranges(num_blocks: int, ranks: int) -> list:
    """The consecutive block indices of each rank: as even as they go, earlier ranks lighter
    (rank 0 also embeds; the last rank's output is what all of them wait for)."""
    if ranks > num_blocks:
        raise ValueError(f"{ranks} processes cannot share {num_blocks} blocks: a pipeline needs a "
                         f"block per process; launch at most {num_blocks}")
    return [range(rank * num_blocks // ranks, (rank + 1) * num_blocks // ranks)
            for rank in range(ranks)]


class PipelineStage:
    """This rank's place in the pipeline: where its input comes from and its output goes."""

    def __init__(self, group, blocks: range):
        self.group, self.blocks = group, blocks
        self.rank, self.size = group.rank(), group.size()

    def receive(self, embeddings: mx.array) -> mx.array:
        """The first block's input here: the embeddings on rank 0, else the previous rank's
        output (same shape and dtype: every rank embeds the same tokens, lazily; only rank 0
        evaluates them)."""
        if self.rank == 0:
            return embeddings
        return mx.distributed.recv_like(embeddings, self.rank - 1, group=self.group)

    def pass_on(self, hidden: mx.array) -> mx.array:
        """The last block's output, sent to the next rank (the returned array depends on the
        send, so that evaluating it sends)."""
        if self.rank == self.size - 1:
            return hidden
        return mx.distributed.send(hidden, self.rank + 1, group=self.group)

    def share_output(self, hidden: mx.array) -> mx.array:
        """The last rank's final hidden states, on every rank, bit for bit. Gathered from every
        rank and the last one's rows kept: the others contribute theirs only to take part (and
        depend on their send, so evaluating the result makes the pipeline run)."""
        return mx.distributed.all_gather(hidden, group=self.group)[-hidden.shape[0]:]


def split_into_stages(model, group):
    """Keep only this rank's blocks of `model` (a MobileLLM, before its weights are evaluated)
    and wire it into the pipeline of `group`; returns the model. Every rank must then run the
    same calls on the same token ids: each call is a collective. Sampling is made to agree too:
    the ranks' random generators are seeded alike (rank 0's fresh seed), so that a sampled
    token is the same token everywhere."""
    if group.size() == 1:
        return model
    decoder = model.decoder
    blocks = block_ranges(len(decoder.layers), group.size())[group.rank()]
    decoder.layers = decoder.layers[blocks.start:blocks.stop]
    decoder.stage = PipelineStage(group, blocks)
    seed = mx.random.randint(0, 2**31 - 1, ()) if group.rank() == 0 else mx.array(0)
    mx.random.seed(mx.distributed.all_sum(seed, group=group).item())
    return model

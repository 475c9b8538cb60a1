"""Byte-level Transformer encoder-decoder for X -> English translation tables (DDS Algorithm 2 runs).

Same interface as the GRU `valuekit.models.builtin.Seq2Seq` (`per_example_loss(x, y)`, `translate(x, max_len)`,
`decode_source(x)`, `is_seq2seq`), so `multidds` and the loop use either. Pre-LayerNorm layers (Xiong et al.
2020: stable without a learning-rate warm-up, which a few hundred CPU steps cannot afford), sinusoidal
positions (no parameters to learn), decoder input and output embeddings tied. reports/multidds.md measures it
against the GRU at equal CPU time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from valuekit.models.builtin import BOS, BYTE_VOCAB, EOS, PAD, decode_bytes


def _sinusoid(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class ByteTransformer(nn.Module):
    """Transformer (Vaswani et al. 2017) over UTF-8 bytes: `layers` encoder and decoder layers of width `dim`,
    `heads` attention heads, feed-forward 4 x dim, dropout `dropout`. Loss: mean token cross-entropy per row."""

    is_seq2seq = True

    def __init__(self, vocab: int = BYTE_VOCAB, dim: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1, max_positions: int = 256):
        super().__init__()
        self.dim = dim
        self.src_emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.register_buffer("pos", _sinusoid(max_positions, dim), persistent=False)
        self.drop = nn.Dropout(dropout)
        enc = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, layers, norm=nn.LayerNorm(dim))

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(emb(ids) * math.sqrt(self.dim) + self.pos[: ids.shape[1]])

    def encode(self, x: torch.Tensor):
        src = x.long()
        pad = src == PAD
        pad[:, 0] = False  # an empty row still attends to its first position (no all-masked softmax)
        return self.encoder(self._embed(self.src_emb, src), src_key_padding_mask=pad), pad

    def _decode(self, prev: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        L = prev.shape[1]
        causal = torch.triu(torch.full((L, L), float("-inf"), device=prev.device), diagonal=1)
        h = self.decoder(self._embed(self.tgt_emb, prev), memory, tgt_mask=causal, memory_key_padding_mask=pad)
        return h @ self.tgt_emb.weight.t()  # tied output embedding

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (N, L, vocab) for targets y (decoder input: BOS + y[:, :-1])."""
        memory, pad = self.encode(x)
        prev = torch.cat([torch.full_like(y[:, :1], BOS), y[:, :-1]], 1)
        return self._decode(prev, memory, pad)

    @staticmethod
    def _trim(ids: torch.Tensor) -> torch.Tensor:
        """Drop all-PAD columns on the right (rows are right-padded): cost follows the batch's longest row."""
        width = int((ids != PAD).sum(1).max().clamp_min(1))
        return ids[:, :width]

    def per_example_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self._trim(x), self._trim(y)
        logits = self.forward(x, y)
        tok = nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=PAD)
        return tok.sum(1) / (y != PAD).sum(1).clamp_min(1)

    @torch.no_grad()
    def translate(self, x: torch.Tensor, max_len: int = 80) -> torch.Tensor:
        """Greedy decoding: (N, <= max_len) token ids, PAD after EOS."""
        memory, pad = self.encode(self._trim(x))
        n = x.shape[0]
        prev = torch.full((n, 1), BOS, dtype=torch.int64, device=x.device)
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        out = []
        for _ in range(max_len):
            tok = self._decode(prev, memory, pad)[:, -1].argmax(-1)
            tok = tok.masked_fill(done, PAD)
            out.append(tok)
            done |= tok == EOS
            if done.all():
                break
            prev = torch.cat([prev, tok.unsqueeze(1)], 1)
        return torch.stack(out, 1)

    def decode_source(self, x) -> list[str]:
        """Source ids back to text (used by the TCS character n-gram prior)."""
        return decode_bytes(x.long().cpu())


def init_transformer_(model: ByteTransformer, generator: torch.Generator) -> None:
    """Xavier-uniform matrices, zero biases, unit LayerNorms, N(0, dim^-1/2) embeddings, all from `generator`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("emb.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * model.dim ** -0.5)
            elif p.dim() > 1:
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for emb in (model.src_emb, model.tgt_emb):
            emb.weight[PAD].zero_()

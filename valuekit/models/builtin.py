"""Small model builders chosen by name and sized from the data: linear, mlp, cnn.

Every classifier is `body` (feature extractor, its output is the model's internal state that
LRDI's teacher reads) followed by `head` (one Linear layer). Inputs are standardised inside the
model with statistics of the training table, so callers pass raw features.
"""


from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

MODELS = ("linear", "mlp", "cnn", "resnet", "seq2seq")


class Standardize(nn.Module):
    """(x - mean) / std with fixed buffers computed from the training table."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """x -> head(body(x)); `features(x)` gives the body output (the student's internal state)."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


class Reshape(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


class BasicBlock(nn.Module):
    """He et al. (CVPR 2016) basic residual block: two 3x3 conv + BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


def resnet_body(c: int, width: int = 16) -> tuple[nn.Sequential, int]:
    """A small ResNet-style feature extractor: a stride-2 3x3 stem (ResNet's downsampling stem, cheaper),
    3 stages of one basic block (widths w, 2w, 4w; strides 1, 2, 2) and global average pooling; ~78k
    parameters at width 16, sized for 28x28 images (28 -> 14 -> 7 -> 4), the `resnet` model."""
    body = nn.Sequential(
        nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return body, 4 * width


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise Linear/Conv layers from `generator` (PyTorch's default scheme, no global RNG)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def build_model(
    name: str,
    *,
    in_features: int,
    num_classes: int,
    image_shape: tuple[int, ...] | None = None,
    hidden: int = 128,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    lora: int = 0,
    checkpointing: bool = False,
) -> Classifier:
    """Build `linear`, `mlp` (two hidden ReLU layers), `cnn` (two 3x3 convs, needs image_shape) or `resnet`
    (a small residual CNN with BatchNorm, `resnet_body`; needs image_shape); causal LMs (valuekit.models.lm) by name,
    with
    LoRA adapters of rank `lora` when > 0 and gradient checkpointing when `checkpointing`."""
    from valuekit.models.lm import build_lm, is_lm

    if is_lm(name):  # causal LMs for instruction tables: in_features is the sequence length
        return build_lm(name, vocab=num_classes, max_len=in_features, hidden=hidden, generator=generator, lora=lora,
                        checkpointing=checkpointing)
    mean = torch.zeros(in_features) if mean is None else mean
    std = torch.ones(in_features) if std is None else std
    norm = Standardize(mean, std)
    if name == "linear":
        body, width = nn.Sequential(norm), in_features
    elif name == "mlp":
        body = nn.Sequential(norm, nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        width = hidden
    elif name == "cnn":
        if image_shape is None:
            raise ValueError("model 'cnn' needs image-shaped features (a list column with an image shape)")
        c = image_shape[0] if len(image_shape) == 3 else 1
        hw = image_shape[-2:]
        body = nn.Sequential(
            norm, Reshape((c, *hw)),
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2 if min(hw) >= 16 else 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, hidden), nn.ReLU(),
        )
        width = hidden
    elif name == "resnet":
        if image_shape is None:
            raise ValueError("model 'resnet' needs image-shaped features (a list column with an image shape)")
        c = image_shape[0] if len(image_shape) == 3 else 1
        net, width = resnet_body(c)
        body = nn.Sequential(norm, Reshape((c, *image_shape[-2:])), *net)
    elif name == "seq2seq":  # byte-level translation tables (valuekit.data.tables.load_text_pairs)
        model = Seq2Seq(vocab=num_classes, hidden=hidden)
        if generator is not None:
            _init_seq2seq_(model, generator)
        return model
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = Classifier(body, nn.Linear(width, num_classes))
    if generator is not None:
        _init_(model, generator)
    return model


def feature_stats(x: torch.Tensor, image_shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean/std of the training features (one scalar pair for images, so convs see one scale)."""
    if hasattr(x, "sample_stats"):  # streamed images (valuekit.data.images.ImageRows): a sample of rows
        m, s = x.sample_stats()
        mean = torch.full((x.shape[1],), m)
        std = torch.full((x.shape[1],), max(s, 1e-6))
    elif image_shape is not None:
        mean = x.mean().expand(x.shape[1]).clone()
        std = x.std().clamp_min(1e-6).expand(x.shape[1]).clone()
    else:
        mean = x.mean(0)
        std = x.std(0).nan_to_num(1.0).clamp_min(1e-6)
    return mean, std


PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 3  # token ids: bytes b are b + BYTE_OFFSET


BYTE_VOCAB = 256 + BYTE_OFFSET


def encode_bytes(texts, max_len: int) -> torch.Tensor:
    """UTF-8 bytes + EOS, right-padded with PAD: (N, max_len) int64. Longer texts are cut to max_len - 1
    bytes at a character boundary (no partial UTF-8 character), then EOS."""
    out = torch.zeros(len(texts), max_len, dtype=torch.int64)
    for i, t in enumerate(texts):
        raw = str(t).encode("utf-8")
        if len(raw) > max_len - 1:
            cut = max_len - 1
            while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # raw[cut] continues a character: cut before it
                cut -= 1
            raw = raw[:cut]
        ids = [b + BYTE_OFFSET for b in raw] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def decode_bytes(ids) -> list[str]:
    """Token ids (N, L) back to text, stopping at the first EOS/PAD (invalid UTF-8 is replaced)."""
    texts = []
    for row in torch.as_tensor(ids).long().tolist():
        out = bytearray()
        for t in row:
            if t in (PAD, EOS):
                break
            if t >= BYTE_OFFSET:
                out.append(t - BYTE_OFFSET)
        texts.append(out.decode("utf-8", errors="replace"))
    return texts


class Seq2Seq(nn.Module):
    """Byte-level GRU encoder-decoder with dot-product (Luong) attention, for X -> English.

    Inputs `x` are source token ids (stored as floats in the table's x), targets `y` are (N, L) token ids.
    Training is teacher-forced with one GRU call over the whole target (no per-time-step loop); loss is the
    mean token cross-entropy per example (`per_example_loss`). `translate` decodes greedily.
    """

    is_seq2seq = True

    def __init__(self, vocab: int = BYTE_VOCAB, hidden: int = 128, emb: int = 64):
        super().__init__()
        self.src_emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.encoder = nn.GRU(emb, hidden // 2, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(hidden, hidden)
        self.decoder = nn.GRU(emb, hidden, batch_first=True)
        self.out = nn.Linear(2 * hidden, vocab)

    def encode(self, x):
        src = x.long()
        mask = src != PAD
        lengths = mask.sum(1).clamp_min(1).cpu()
        # packed, so the backward direction starts at each row's own end: a row's encoding does not
        # depend on how much padding its batch has
        packed = nn.utils.rnn.pack_padded_sequence(self.src_emb(src), lengths, batch_first=True, enforce_sorted=False)
        enc, _ = self.encoder(packed)
        enc, _ = nn.utils.rnn.pad_packed_sequence(enc, batch_first=True, total_length=src.shape[1])
        pooled = (enc * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return enc, mask, torch.tanh(self.bridge(pooled)).unsqueeze(0)

    def _logits(self, dec, enc, mask):
        att = torch.einsum("nth,nsh->nts", dec, enc).masked_fill(~mask.unsqueeze(1), float("-inf"))
        ctx = torch.einsum("nts,nsh->nth", torch.softmax(att, -1), enc)
        return self.out(torch.cat([dec, ctx], -1))

    def forward(self, x, y):
        """Teacher-forced logits (N, L, vocab) for targets y (input: BOS + y[:, :-1])."""
        enc, mask, h0 = self.encode(x)
        prev = torch.cat([torch.full_like(y[:, :1], BOS), y[:, :-1]], 1)
        dec, _ = self.decoder(self.tgt_emb(prev), h0)
        return self._logits(dec, enc, mask)

    @staticmethod
    def _trim(ids):
        """Drop the all-PAD columns at the right of a batch (rows are right-padded), so cost follows the
        longest row of the batch rather than the table's max_len; results are unchanged."""
        width = int((ids != PAD).sum(1).max().clamp_min(1))
        return ids[:, :width]

    def per_example_loss(self, x, y):
        x, y = self._trim(x), self._trim(y)
        logits = self.forward(x, y)
        tok = nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=PAD)
        return tok.sum(1) / (y != PAD).sum(1).clamp_min(1)

    @torch.no_grad()
    def translate(self, x, max_len: int = 80) -> torch.Tensor:
        """Greedy decoding: (N, max_len) token ids, PAD after EOS."""
        enc, mask, h = self.encode(self._trim(x))
        tok = torch.full((x.shape[0], 1), BOS, dtype=torch.int64, device=x.device)
        out, done = [], torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(max_len):
            dec, h = self.decoder(self.tgt_emb(tok), h)
            tok = self._logits(dec, enc, mask).argmax(-1)
            tok = tok.masked_fill(done.unsqueeze(1), PAD)
            out.append(tok)
            done |= tok.squeeze(1) == EOS
            if done.all():
                break
        return torch.cat(out, 1)

    def decode_source(self, x) -> list[str]:
        """Source ids back to text (used by the TCS character n-gram prior)."""
        return decode_bytes(x.long().cpu())


def _init_seq2seq_(model: nn.Module, generator: torch.Generator) -> None:
    """Uniform(-1/sqrt(fan), 1/sqrt(fan)) for every parameter from `generator` (PyTorch's GRU default scheme)."""
    with torch.no_grad():
        for p in model.parameters():
            fan = p.shape[-1] if p.dim() > 1 else p.shape[0]
            bound = 1 / math.sqrt(fan)
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
        for emb in (model.src_emb, model.tgt_emb):
            emb.weight[PAD].zero_()


def check_token_range(table, size: int, name: str) -> None:
    """Every token id of `table` (a ValueDataset whose rows are ids) is in [0, size), else one InputError naming
    the id, the row's id and the file."""
    from valuekit.errors import refusal

    x = table.x
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        return
    flat = x.reshape(len(x), -1)
    bad = (flat < 0) | (flat >= size) | (flat != flat.round())
    if not bad.any():
        return
    row = int(bad.any(1).nonzero()[0])
    value = flat[row][bad[row]][0].item()
    shown = int(value) if float(value).is_integer() else value
    ident = table.ids[row].item() if isinstance(table.ids[row], np.generic) else table.ids[row]
    where = table.path or table.where or f"{table.name} table"
    raise refusal(
        f"{where}: token id {shown} at id {ident!r} (row {row}) is outside "
        f"--model {name}'s embedding of {size} entries (ids 0..{size - 1})"
    )

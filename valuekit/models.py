"""Small model builders chosen by name and sized from the data: linear, mlp, cnn.

Every classifier is `body` (feature extractor, its output is the model's internal state that
LRDI's teacher reads) followed by `head` (one Linear layer). Inputs are standardised inside the
model with statistics of the training table, so callers pass raw features.
"""

from __future__ import annotations

import math

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
    (a small residual CNN with BatchNorm, `resnet_body`; needs image_shape); causal LMs (valuekit.lm) by name, with
    LoRA adapters of rank `lora` when > 0 and gradient checkpointing when `checkpointing`."""
    from valuekit.lm import build_lm, is_lm

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
    elif name == "seq2seq":  # byte-level translation tables (valuekit.datasets.load_text_pairs)
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
    if hasattr(x, "sample_stats"):  # streamed images (valuekit.images.ImageRows): a sample of rows
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


# ---------------------------------------------------------------- byte-level translation (DDS Algorithm 2)

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
        for name, p in model.named_parameters():
            fan = p.shape[-1] if p.dim() > 1 else p.shape[0]
            bound = 1 / math.sqrt(fan)
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
        for emb in (model.src_emb, model.tgt_emb):
            emb.weight[PAD].zero_()


# ---------------------------------------------------------------- a user's model

EXTRAS = {"torchvision": "vision", "timm": "timm"}  # model prefix -> pip extra that installs it


def is_builtin(spec) -> bool:
    """A model valuekit builds itself: a built-in name or a causal LM (`causal-lm`, `hf-config:DIR`, `hf:DIR`)."""
    from valuekit.lm import is_lm

    return isinstance(spec, str) and (spec in MODELS or is_lm(spec))


def describe_model(spec) -> str:
    """The text run.json keeps for a model given as a name, `pkg.mod:factory`, a factory or a module."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, nn.Module):
        return f"python:{type(spec).__module__}.{type(spec).__qualname__}"
    return f"python:{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"


def check_model_spec(spec) -> None:
    """Validate the form of a model spec without importing anything (InputError otherwise)."""
    from valuekit.errors import InputError

    if isinstance(spec, nn.Module) or (callable(spec) and not isinstance(spec, str)):
        return
    if not isinstance(spec, str) or not spec:
        raise InputError(f"--model {spec!r}: give a built-in name ({', '.join(MODELS)}), package.module:factory, "
                         f"torchvision:NAME or timm:NAME")
    if is_builtin(spec):
        return
    head, sep, tail = spec.partition(":")
    if not sep or not head or not tail:
        raise InputError(f"--model {spec!r}: not a built-in model ({', '.join(MODELS)}); a model of your own is "
                         f"given as package.module:factory (or torchvision:NAME, timm:NAME)")


def _import_factory(spec: str):
    """`pkg.mod:attr` -> the callable, imported from the current directory / PYTHONPATH."""
    import importlib
    import sys

    from valuekit.errors import InputError

    modname, _, attr = spec.partition(":")
    if modname == "python":
        raise InputError(f"--model {spec}: names a Python object given to valuekit.train(model=...); pass that "
                         f"object again from Python (the command line takes package.module:factory)")
    if "" not in sys.path and "." not in sys.path:  # the console script's sys.path lacks the working directory
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name and modname.startswith(exc.name):
            raise InputError(f"--model {spec}: cannot import module {modname!r} (not in the current directory or "
                             f"on PYTHONPATH)") from None
        raise InputError(f"--model {spec}: importing {modname!r} failed: {exc}") from None
    except Exception as exc:
        raise InputError(f"--model {spec}: importing {modname!r} failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"--model {spec}: module {modname!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"--model {spec}: {attr!r} is not callable (expected factory(num_classes=, input_shape=))")
    return obj


class ShapedInput(nn.Module):
    """Feeds a user's network rows reshaped from the table's flat features to (N, *input_shape);
    `repeat_channels` > 1 copies a single-channel image to that many channels (RGB models on grey images)."""

    def __init__(self, net: nn.Module, input_shape, repeat_channels: int = 1):
        super().__init__()
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        self.repeat_channels = int(repeat_channels)

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.input_shape)
        if self.repeat_channels > 1:
            x = x.expand(-1, self.repeat_channels, *self.input_shape[1:])
        return self.net(x)


def _hub_model(spec: str, num_classes: int, input_shape) -> nn.Module:
    """torchvision:NAME / timm:NAME with random weights (nothing is downloaded)."""
    import importlib

    from valuekit.errors import InputError

    hub, _, name = spec.partition(":")
    try:
        lib = importlib.import_module(hub)
    except Exception as exc:  # not installed, or installed but broken beside this torch
        why = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"cannot be imported ({type(exc).__name__})"
        raise InputError(f"--model {spec}: {hub} {why}; install the extra: pip install 'valuekit[{EXTRAS[hub]}]'") from None
    chans = input_shape[0] if len(input_shape) == 3 else 1
    try:
        if hub == "torchvision":
            net = lib.models.get_model(name, weights=None, num_classes=num_classes)
        else:
            net = lib.create_model(name, pretrained=False, num_classes=num_classes, in_chans=chans)
    except Exception as exc:
        raise InputError(f"--model {spec}: {hub} cannot build {name!r}: {type(exc).__name__}: {exc}") from None
    repeat = 1
    if hub == "torchvision" and chans == 1:  # torchvision classifiers take 3 channels
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        repeat = first.in_channels if first is not None and first.in_channels > 1 else 1
    return ShapedInput(net, input_shape, repeat)


def resolve_factory(spec):
    """A callable (num_classes, input_shape) -> nn.Module for `spec`: `pkg.mod:factory` (imported once),
    `torchvision:NAME`, `timm:NAME`, a factory function, or an nn.Module (deep-copied at every build)."""
    import copy

    if isinstance(spec, nn.Module):
        return lambda num_classes, input_shape: copy.deepcopy(spec)
    if isinstance(spec, str):
        hub = spec.partition(":")[0]
        if hub in EXTRAS:
            return lambda num_classes, input_shape: _hub_model(spec, num_classes, input_shape)
        fn = _import_factory(spec)
    else:
        fn = spec
    return lambda num_classes, input_shape: fn(num_classes=num_classes, input_shape=tuple(input_shape))


def build_user_model(spec, *, num_classes: int, input_shape, generator: torch.Generator | None = None,
                     factory=None) -> nn.Module:
    """Build a user's model and wrap it so it takes the table's flat rows (ShapedInput).

    A factory's own random initialisation runs under a seed drawn from `generator`, inside
    `torch.random.fork_rng`, so runs are reproducible and the global RNG is left as it was.
    Raises InputError naming the factory when it raises or returns something other than an nn.Module.
    """
    from valuekit.errors import InputError

    name = describe_model(spec)
    factory = factory or resolve_factory(spec)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net = factory(num_classes, tuple(input_shape))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"--model {name}: the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise InputError(f"--model {name}: the factory returned {type(net).__name__}, not a torch.nn.Module")
    if isinstance(net, ShapedInput):
        return net
    return ShapedInput(net, input_shape)


def check_output(model: nn.Module, x: torch.Tensor, num_classes: int, name: str) -> None:
    """One forward on a few rows (eval mode, no grad, buffers restored): the output must be (rows, num_classes)."""
    from valuekit.errors import InputError

    state = {k: b.clone() for k, b in model.named_buffers()}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise InputError(f"--model {name}: forward on rows of shape {tuple(x.shape[1:])} failed: "
                         f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    finally:
        model.train(was)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(state[k])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"--model {name}: output has shape {got} for {x.shape[0]} rows; expected "
                         f"({x.shape[0]}, {num_classes}) (one logit per class)")


# ---------------------------------------------------------------- features from a forward hook


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the last nn.Linear in registration order (the usual classifier head)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; name the feature layer explicitly")
    return found[-1]


def has_batchnorm(model) -> bool:
    """Whether any submodule is a batch-norm layer (its batch statistics couple the rows of a batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def feature_module(model: nn.Module, layer: str = "") -> nn.Module:
    """The module whose *input* is the model's feature vector: `layer` by name (from named_modules; a
    name without the `net.` prefix of a wrapped user model is accepted), or the last nn.Linear."""
    from valuekit.errors import InputError

    if not layer:
        try:
            return last_linear(model)[1]
        except ValueError as exc:
            raise InputError(f"{exc} (--set feature_layer=NAME)") from None
    mods = dict(model.named_modules())
    for cand in (layer, f"net.{layer}"):
        if cand in mods:
            return mods[cand]
    raise InputError(f"--set feature_layer={layer}: no such layer; layers: {', '.join(n for n in mods if n)[:300]}")


def features_and_logits(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of `model`; returns (input of `layer` flattened to (N, -1), logits). The features keep their
    graph (callers detach them where the paper's teacher reads a detached state)."""
    box = []
    handle = layer.register_forward_pre_hook(lambda mod, args: box.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"the feature layer {type(layer).__name__} was not called in the forward pass")
    feats = box[-1]
    return feats.reshape(feats.shape[0], -1), logits


def feature_dim(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> int:
    """Width of the features `features_and_logits` returns (an nn.Linear's in_features, else one probe
    forward in eval mode without grad, which leaves batch-norm statistics untouched)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return features_and_logits(model, x[:2], layer)[0].shape[1]
    finally:
        model.train(was)

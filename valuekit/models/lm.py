"""Causal language models for instruction tables (valuekit.data.instructions).

Model names: `causal-lm` (a small built-in decoder-only Transformer, no extra package), `hf-config:PATH`
(a Hugging Face causal LM built from PATH/config.json with random weights drawn from the run's
generator), `hf:PATH` (config + weights from a local directory; nothing is downloaded).

Every model here maps x (N, L) float input ids, PAD_INPUT after each row's end, to logits laid out
(N, V, L) -- the class axis second, as torch's cross_entropy expects -- so the shared per-example
loss and the methods' `logits.argmax(1) == y` work unchanged. Each forward runs only up to the
batch's longest row and pads the logits back with zeros (positions whose target is IGNORE).
"""


from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from valuekit.errors import InputError, hold_log, say

LM_PREFIXES = ("hf:", "hf-config:")


BUILTIN = "causal-lm"


def is_lm(name: str) -> bool:
    return name == BUILTIN or name.startswith(LM_PREFIXES)


def _trim(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int64 ids of the batch up to its longest row (PAD_INPUT -> 0) and the full width."""
    ids = x.long()
    valid = ids >= 0
    width = int(valid.any(0).nonzero().max()) + 1 if valid.any() else 1
    return ids[:, :width].clamp_min(0), ids.shape[1]


def _layout(logits: torch.Tensor, full: int) -> torch.Tensor:
    """(N, l, V) -> (N, V, full), zero logits after l."""
    out = logits.transpose(1, 2)
    return F.pad(out, (0, full - out.shape[2])) if out.shape[2] < full else out


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h):
        n, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return h + self.mlp(self.ln2(h))


class CausalLM(nn.Module):
    """Decoder-only Transformer (pre-LayerNorm, learned positions, tied input/output embedding)."""

    def __init__(self, vocab: int, max_len: int, d: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.checkpointing = False  # build_lm(checkpointing=True): blocks recomputed in the backward

    def forward(self, x):
        ids, full = _trim(x)
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=False) if recompute else b(h)
        return _layout(self.ln(h) @ self.tok.weight.T, full)


class HFCausalLM(nn.Module):
    """A transformers causal LM behind valuekit's (N, L) -> (N, V, L) interface."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        ids, full = _trim(x)
        # right padding under a causal mask: real positions never attend to the padding, so no mask is needed
        return _layout(self.inner(input_ids=ids, use_cache=False).logits, full)


@contextmanager
def without_checkpointing(model: nn.Module):
    """Gradient checkpointing (build_lm(checkpointing=True)) switched off inside: torch.func transforms cannot
    run a checkpointed block. A model without it is left as it is."""
    saved = [(m, a, getattr(m, a)) for m in model.modules() for a in ("checkpointing", "gradient_checkpointing")
             if isinstance(getattr(m, a, None), bool) and getattr(m, a)]
    for m, a, _ in saved:
        setattr(m, a, False)
    try:
        yield model
    finally:
        for m, a, v in saved:
            setattr(m, a, v)


def _init_(model: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Random weights from `generator` (GPT-2's scheme: N(0, std) matrices/embeddings, zero biases,
    unit norms), never from torch's global RNG."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D":  # GPT-2 uses Conv1D
            nn.init.normal_(m.weight, 0.0, std, generator=generator)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif "norm" in type(m).__name__.lower():
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _model_error(name: str, text: str, cli: str | None = None) -> InputError:
    """InputError about the model `name`: `model='NAME': text` in the library, `--model NAME: text` (or `cli`) on the
    command line."""
    return InputError(f"model={name!r}: {text}", cli=f"--model {name}: {cli or text}")


def _hf_config(path: str, name: str):
    try:
        import transformers
    except ImportError:
        raise _model_error(name, "needs the optional 'transformers' package (pip install 'valuekit[llm]')") from None
    hold_log("transformers")  # its warnings about a config (a token id beyond the vocabulary) wait for the checks
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise _model_error(name, f"{folder} has no config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise _model_error(name, f"{folder}/config.json does not load ({_first(exc)})") from None
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping:
        raise _model_error(name, f"{folder} holds a {config.model_type!r} model, which has no causal-LM head "
                         f"in transformers")
    if config.model_type in BIDIRECTIONAL and not getattr(config, "is_decoder", False):
        raise _model_error(
            name, f'{folder} holds a {config.model_type!r} encoder without "is_decoder": true; '
            f"it attends both ways (a later token changes earlier logits), so it is not a causal LM"
        )
    return transformers, config


#: encoder model types whose transformers causal-LM head is causal only with is_decoder=True in the config
BIDIRECTIONAL = frozenset({"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie",
                           "data2vec-text", "roberta-prelayernorm", "xmod", "rembert", "megatron-bert",
                           "bert-generation", "big_bird", "nezha", "qdqbert", "mega", "markuplm"})


def _sized(config, vocab: int):
    """A random-weight config with the tokenizer's vocabulary (`check_lm` says so when config.json differs); special
    token ids the vocabulary no longer holds (GPT-2's eos 50256 beside 259 byte tokens) are dropped."""
    if getattr(config, "vocab_size", vocab) != vocab:
        config.vocab_size = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            t = getattr(config, key, None)
            if isinstance(t, int) and t >= vocab:
                setattr(config, key, None)
    return config


def _first(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def check_lm(name: str, *, vocab: int, max_len: int, lora: int = 0) -> None:
    """Validate an LM name (and LoRA rank) against the data before anything is written (InputError, one line)."""
    if name == BUILTIN:
        if lora:
            why = "LoRA adapters need a transformers model"
            raise InputError(f"lora={lora}: {why} (model='hf:DIR' or 'hf-config:DIR'), not the built-in {BUILTIN}",
                             cli=f"--lora {lora}: {why} (--model hf:DIR or hf-config:DIR), not the built-in {BUILTIN}")
        return
    if lora:
        _peft(lora)
    kind, _, path = name.partition(":")
    _, config = _hf_config(path, name)
    v = getattr(config, "vocab_size", None)
    if kind == "hf-config" and v is not None and v != vocab:
        # random weights: the tokenizer decides the vocabulary (a default GPT2Config's 50,257 rows beside the byte
        # tokenizer's 259 made every step ~75x slower); said once, here at the edge
        say(f"valuekit: note: --model {name}: config.json has vocab_size {v}, the tokenizer {vocab}; the model is "
            f"built with {vocab}")
    elif v is not None and v < vocab:
        raise _model_error(name, f"vocab_size {v} is smaller than the tokenizer's {vocab}")
    for key in ("n_positions", "max_position_embeddings"):
        p = getattr(config, key, None)
        if isinstance(p, int) and p < max_len:
            short = f"{key} {p} is smaller than the sequence length {max_len}"
            raise _model_error(name, f"{short} (max_len)", f"{short} (--max-len)")
    if kind == "hf":
        if not any(Path(path).glob("*.safetensors")) and not any(Path(path).glob("*.bin")):
            raise _model_error(name, f"{path} has no weights (*.safetensors / *.bin); use hf-config:{path} "
                             f"for random weights")
        archs = getattr(config, "architectures", None) or []
        tied = getattr(config, "tie_word_embeddings", True)
        if archs and not tied and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            # a base model's weights: the untied output layer would start random, silently
            raise _model_error(name, f"{path} holds {archs[0]} weights, which have no causal-LM head")


def build_lm(name: str, *, vocab: int, max_len: int, hidden: int = 128,
             generator: torch.Generator | None = None, lora: int = 0, checkpointing: bool = False) -> nn.Module:
    """The causal LM `name` for a vocabulary of `vocab` ids and sequences of `max_len` tokens (LoRA adapters of
    rank `lora` when > 0, `add_lora`; gradient checkpointing of its blocks in training when `checkpointing`)."""
    if name == BUILTIN:
        model = CausalLM(vocab, max_len, d=hidden, heads=4 if hidden % 4 == 0 else 1)
        if generator is not None:
            _init_(model, generator)
        model.checkpointing = checkpointing
        return model
    kind, _, path = name.partition(":")
    transformers, config = _hf_config(path, name)
    if kind == "hf-config":
        try:
            inner = transformers.AutoModelForCausalLM.from_config(_sized(config, vocab))
        except Exception as exc:  # a config transformers cannot build (e.g. n_embd not divisible by n_head)
            raise _model_error(name, f"{path}/config.json does not build a model ({_first(exc)})") from None
        if generator is not None:
            _init_(inner, generator, std=getattr(config, "initializer_range", 0.02))
            if hasattr(inner, "tie_weights"):
                inner.tie_weights()
    else:
        try:
            inner, info = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                                            output_loading_info=True)
        except Exception as exc:
            raise _model_error(name, f"weights do not load ({_first(exc)})") from None
        missing = [k for k in info.get("missing_keys", []) if "lm_head" in k or "embed_out" in k]
        if missing:
            raise _model_error(name, f"the weights have no causal-LM head ({missing[0]} missing)")
    inner.float()
    if checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(inner, "activation_checkpointing_enable"):  # the name since transformers 5
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if lora:
        inner = add_lora(inner, lora, generator=generator)
    if checkpointing:
        _drop_input_grad_hooks(inner)
    return HFCausalLM(inner)


def _drop_input_grad_hooks(model: nn.Module) -> None:
    """Remove the forward hooks that make the input embeddings' output require grad. transformers adds one when
    checkpointing is enabled and peft adds another for adapters (losing the first one's handle, so
    `disable_input_require_grads` cannot remove both); a non-reentrant checkpoint does not need them, and they
    break torch.func transforms (DDS's per-example dots)."""
    emb = model.get_input_embeddings()
    for key, hook in list(emb._forward_hooks.items()):
        if getattr(hook, "__name__", "") == "make_inputs_require_grads":
            del emb._forward_hooks[key]


def _peft(rank: int):
    try:
        import peft
    except ImportError:
        why = "needs the optional 'peft' package (pip install 'valuekit[lora]')"
        raise InputError(f"lora={rank}: {why}", cli=f"--lora {rank}: {why}") from None
    return peft


def add_lora(model: nn.Module, rank: int, *, generator: torch.Generator | None = None, alpha: float | None = None,
             targets: list[str] | None = None) -> nn.Module:
    """`model` with LoRA adapters (Hu et al. 2021, h = W x + (alpha / r) B A x) on its attention/MLP projections
    (peft's per-architecture default modules, else every Linear/Conv1D outside the output layer), base weights
    frozen. alpha defaults to 2 r; no adapter dropout (the per-example rewards would be random otherwise).
    A is drawn from `generator` (peft's Kaiming-uniform range; never torch's global RNG), B = 0, so the adapted
    model starts equal to `model`."""
    peft = _peft(rank)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets is None:
        mapping = getattr(peft.utils.constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {})
        targets = mapping.get(model_type)
    if not targets:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not head})
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=list(targets),
                             bias="none", fan_in_fan_out=conv1d)  # GPT-2's Conv1D stores its weight transposed
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_A" in name and generator is not None:
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) as peft, from our generator
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
            elif "lora_B" in name:
                p.zero_()
    return adapted


def token_lengths(x: torch.Tensor) -> torch.Tensor:
    """Tokens per row of an instruction table's x (positions before PAD_INPUT)."""
    if hasattr(x, "lengths"):  # packed rows (valuekit.data.token_rows.TokenRows) know them without building x
        return x.lengths()
    return (x >= 0).sum(1)

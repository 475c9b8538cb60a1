"""Per-example gradient · vector dot products.

DDS (Wang et al., "Optimizing Data Usage via Differentiable Rewards", ICML 2020,
Alg. 1 line 11) rewards training example ``i`` with

    r_i = ∇_θ ℓ(x_i, y_i; θ_{t-1}) · v,

where ``v`` is a parameter-shaped vector (the mean dev-batch gradient
``∇_θ J(θ_t, D_dev)``).  This module computes the ``B`` dot products of a batch
in three ways (``DOT_METHODS``):

``"exact"``
    One forward-mode pass (``torch.func.jvp``) of ``params -> per-example losses``
    along the tangent ``v``: the JVP *is* the vector of dot products, so
    per-example gradients are never materialised.  Exact to floating-point
    precision.
``"taylor"``
    The paper's first-order approximation
    ``∇ℓ_i · v ≈ (ℓ_i(θ + ε v̂) − ℓ_i(θ)) / ε · ||v||`` with ``v̂ = v / ||v||``
    (two forward passes, no backward).
``"ghost"``
    Layer-wise dot products from captured layer inputs and output gradients
    of one backward pass (``nn.Linear`` and ``nn.Conv2d`` only).

``"vmap"``
    ``torch.func.vmap`` over per-example ``grad`` of a batch of one, then an
    explicit dot with ``v`` (materialises ``B x |θ|``; processed in chunks).  Used
    automatically by ``"exact"`` when a layer has no forward-mode AD formula.

``per_example_dots_loop`` is an explicit per-example loop kept as a reference.

Any module works: Linear/Conv, LayerNorm, Embedding, attention, residual blocks are
per-example already.  **Batch norm in training mode** couples the examples of a batch
through its batch statistics.  valuekit's choice: a per-example loss ``ℓ_i`` is the
batch's own forward (the same numbers the model step computed) with the batch mean and
(biased) variance of every training-mode batch-norm layer *held fixed*: they are measured
once on the batch at ``θ`` and fed to the layer as running statistics in eval mode.  So
``∇θ ℓ_i`` holds no term through another example (no leakage), forward values equal the
training forward, and ``"exact"``, ``"vmap"`` and the loop agree.  Eval-mode batch norm
uses its running statistics as always.  (Layers with ``track_running_stats=False`` cannot be
frozen this way and raise ``NotImplementedError``.)

Conventions shared by all functions:

* ``loss_fn(logits, y)`` returns per-example losses of shape ``(B,)``
  (default: cross-entropy with ``reduction="none"``).
* ``params`` optionally overrides the module's parameters (e.g. θ_{t−1} kept
  from before an optimizer step); it is applied with
  ``torch.func.functional_call`` and the module itself is never modified.
  Missing trainable entries are taken from the module.
* ``v`` is a dict keyed by the names of the *trainable* parameters
  (``requires_grad=True``, in ``model.named_parameters()`` order), or a
  sequence of tensors in that order.
* No ``.grad`` field of a model parameter is written, the train/eval flags
  of all submodules are left as they were, and buffers (batch-norm running
  statistics) are not updated: every forward runs on copies of the buffers.
"""


from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from valuekit.ops.losses import per_example_loss
from valuekit.ops.modes import eval_mode

__all__ = [
    "DOT_METHODS",
    "per_example_dots",
    "per_example_dots_loop",
    "mean_gradient",
    "trainable_names",
    "flatten",
]


DOT_METHODS = ("exact", "taylor", "ghost", "vmap")


LossFn = Callable[[Tensor, Tensor], Tensor]


VectorLike = Mapping[str, Tensor] | Sequence[Tensor]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad=True``, in ``named_parameters`` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def flatten(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate a dict (in its order) or sequence of tensors into one flat vector."""
    ts = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    return torch.cat([t.reshape(-1) for t in ts])


def _split_params(
    model: nn.Module, params: Mapping[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Return (trainable primals, other overrides), all detached."""
    names = trainable_names(model)
    if not names:
        raise ValueError("model has no trainable parameters")
    own = dict(model.named_parameters())
    params = {} if params is None else dict(params)
    primals = {n: (params[n] if n in params else own[n]).detach() for n in names}
    others = {n: t.detach() for n, t in params.items() if n not in primals}
    return primals, others


def _resolve_v(v: VectorLike, primals: Mapping[str, Tensor]) -> dict[str, Tensor]:
    names = list(primals)
    if isinstance(v, Mapping):
        if set(v) != set(names):
            missing = sorted(set(names) - set(v))
            extra = sorted(set(v) - set(names))
            raise ValueError(
                f"v keys must equal the trainable parameter names; missing={missing}, extra={extra}"
            )
        items = [(n, v[n]) for n in names]
    else:
        v = list(v)
        if len(v) != len(names):
            raise ValueError(f"v has {len(v)} tensors but the model has {len(names)} trainable parameters")
        items = list(zip(names, v))
    out = {}
    for n, t in items:
        p = primals[n]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"v[{n!r}] has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        out[n] = t.detach().to(dtype=p.dtype, device=p.device)
    return out


def _call(model: nn.Module, others: Mapping[str, Tensor], p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``functional_call`` with fresh copies of all buffers, so in-place buffer
    updates (batch-norm running statistics in training mode) neither touch the
    module nor break ``torch.func`` transforms."""
    state = {n: b.clone() for n, b in model.named_buffers()}
    for n, t in others.items():
        state[n] = t.clone() if n in state else t
    state.update(p)
    return functional_call(model, state, (x,))


def _check_losses(losses: Tensor, batch: int) -> Tensor:
    if losses.shape != (batch,):
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({batch},), got {tuple(losses.shape)}"
        )
    return losses


def _train_batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _freeze_batchnorm(model: nn.Module, others: dict[str, Tensor], primals: Mapping[str, Tensor], x: Tensor):
    """Batch statistics of the training-mode batch-norm layers on ``x`` at ``primals``, as running-statistics
    overrides (added to ``others``); returns the layers, which the caller runs in eval mode (module doc)."""
    bns = _train_batchnorms(model)
    if not bns:
        return []
    for name, m in bns:
        if m.running_mean is None:
            raise NotImplementedError(
                f"{type(m).__name__} {name!r} has track_running_stats=False: its batch statistics cannot be held "
                f"fixed for per-example gradients; build it with track_running_stats=True")
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name):
        def record(mod, args):
            a = args[0].detach().float() if args[0].dtype in (torch.float16, torch.bfloat16) else args[0].detach()
            dims = [0, *range(2, a.dim())]
            seen[name] = (a.mean(dims), a.var(dims, unbiased=False))  # what the training forward normalises with
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns]
    try:
        with torch.no_grad():
            _call(model, others, primals, x)
    finally:
        for h in handles:
            h.remove()
    buffers = dict(model.named_buffers())
    for name, (mean, var) in seen.items():  # in the buffers' dtype (the input may be bf16 under autocast)
        dtype = buffers[f"{name}.running_mean"].dtype
        others[f"{name}.running_mean"], others[f"{name}.running_var"] = mean.to(dtype), var.to(dtype)
    return [m for _, m in bns]


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def mean_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Gradient of the mean per-example loss, ``(1/B) Σ_i ∇θ ℓ_i``, as a detached
    name -> tensor dict over the trainable parameters (the DDS vector ``v`` when
    called on a dev batch).  Uses the model's current train/eval mode; ``.grad``
    fields are not touched."""
    loss_fn = loss_fn or per_example_loss
    primals, others = _split_params(model, params)

    def mean_loss(p):
        out = _call(model, others, p, x)
        return _check_losses(loss_fn(out, y), x.shape[0]).mean()

    with torch.enable_grad():
        g = torch.func.grad(mean_loss)(primals)
    return {n: t.detach() for n, t in g.items()}


def per_example_dots(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    v: VectorLike,
    *,
    method: str = "exact",
    loss_fn: LossFn | None = None,
    params: Mapping[str, Tensor] | None = None,
    eps: float = 1e-3,
    batch_stats: str = "coupled",
) -> Tensor:
    """Return ``r`` of shape ``(B,)`` with ``r_i = ∇θ ℓ(x_i, y_i; θ) · v``.

    ``batch_stats`` matters only for batch-norm layers in training mode: ``"coupled"`` (default) gives
    the derivative of the i-th term of the batch loss, including its path through the batch statistics
    (what a meta-gradient of a batch objective needs); ``"fixed"`` holds the statistics fixed (module
    doc: no other example's term in row i's gradient, the per-example value DDS rewards use).

    This is the DDS reward of Wang et al. (ICML 2020), Alg. 1 line 11, with
    ``θ = params`` (default: the module's current parameters) and ``v`` the
    (dev-)gradient vector.  ``method`` is one of ``DOT_METHODS``:

    * ``"exact"``: a single ``torch.func.jvp`` of ``θ -> (ℓ_1..ℓ_B)`` along ``v``.
    * ``"taylor"``: ``(ℓ_i(θ + ε v̂) − ℓ_i(θ)) / ε · ||v||``, ``v̂ = v/||v||``
      (the paper's first-order approximation; error O(ε) for smooth models, but
      an example whose ReLU pattern flips between θ and θ + ε v̂ can be off by
      more, whatever ε).  Both forward passes
      run in **eval mode** (dropout off, batch-norm uses running statistics) so
      they are deterministic and comparable; the flags are restored afterwards.
      ``v = 0`` gives zeros.
    * ``"ghost"``: one backward pass to the layer outputs; for every
      ``nn.Linear``/``nn.Conv2d`` the dot product is ``<∂ℓ_i/∂out_i, layer_V(in_i)>``
      (see :func:`_ghost_dots`).  Raises ``NotImplementedError`` if another module
      type owns trainable parameters.

    ``"exact"`` and ``"ghost"`` use the model's current mode (so with active
    dropout they are exact for that one random forward pass).  With batch-coupled
    layers (batch-norm in training mode) ``"exact"`` differentiates ``ℓ_i``
    including its dependence through the batch statistics (so it differs from
    the batch-of-one loop), and ``"ghost"`` raises ``NotImplementedError``.
    """
    loss_fn = loss_fn or per_example_loss
    primals, others = _split_params(model, params)
    tangents = _resolve_v(v, primals)
    if method == "taylor":
        return _taylor_dots(model, x, y, tangents, loss_fn, primals, others, eps)
    if method not in DOT_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {DOT_METHODS}")
    if method == "ghost":
        return _ghost_dots(model, x, y, tangents, loss_fn, primals, others)
    if batch_stats not in ("coupled", "fixed"):
        raise ValueError(f"batch_stats {batch_stats!r}: use 'coupled' or 'fixed'")
    # full precision even inside a bf16/fp16 autocast step (forward-mode AD does not mix with autocast)
    # ... and attention on the math kernel: the fused scaled-dot-product kernels have no forward-mode formula
    with torch.autocast(x.device.type, enabled=False), second_order():
        # batch statistics held fixed (module doc), or left to couple the rows
        frozen = _freeze_batchnorm(model, others, primals, x) if batch_stats == "fixed" else []
        with eval_mode(*frozen):
            if method == "vmap":
                return _vmap_dots(model, x, y, tangents, loss_fn, primals, others)
            try:
                return _exact_dots(model, x, y, tangents, loss_fn, primals, others)
            except (NotImplementedError, RuntimeError) as exc:
                if "forward" not in str(exc).lower():  # only a missing forward-mode formula falls back
                    raise
                return _vmap_dots(model, x, y, tangents, loss_fn, primals, others)


def per_example_dots_loop(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    v: VectorLike,
    *,
    loss_fn: LossFn | None = None,
    params: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Reference implementation: loop over examples, ``torch.autograd.grad`` of
    ``ℓ(x_i, y_i; θ)`` (batch of one; training-mode batch norm with the batch's statistics
    held fixed, module doc) and an explicit dot product with ``v``."""
    loss_fn = loss_fn or per_example_loss
    primals, others = _split_params(model, params)
    tangents = _resolve_v(v, primals)
    frozen = _freeze_batchnorm(model, others, primals, x)
    with eval_mode(*frozen):
        return _loop_dots(model, x, y, tangents, loss_fn, primals, others)


def _loop_dots(model, x, y, tangents, loss_fn, primals, others) -> Tensor:
    leaves = {n: p.clone().requires_grad_(True) for n, p in primals.items()}
    names = list(leaves)
    dtype = next(iter(primals.values())).dtype
    out = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    with torch.enable_grad():
        for i in range(x.shape[0]):
            logits = _call(model, others, leaves, x[i : i + 1])
            loss = _check_losses(loss_fn(logits, y[i : i + 1]), 1).sum()
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    out[i] += (g * tangents[n]).sum()
    return out


# ---------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------
def _vmap_dots(model, x, y, tangents, loss_fn, primals, others, chunk: int = 64) -> Tensor:
    """Per-example gradients by vmap over batches of one, dotted with v (``chunk`` rows at a time)."""
    names = list(primals)

    def one(p, xi, yi):
        out = _call(model, others, p, xi.unsqueeze(0))
        return _check_losses(loss_fn(out, yi.unsqueeze(0)), 1).sum()

    per_row = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), randomness="different")
    parts = []
    for i in range(0, x.shape[0], chunk):
        with warnings.catch_warnings():  # kernels without a batching rule run in a slower loop: fine
            warnings.filterwarnings("ignore", message=".*performance drop.*", category=UserWarning)
            g = per_row(primals, x[i: i + chunk], y[i: i + chunk])
        parts.append(sum((g[n].reshape(g[n].shape[0], -1) * tangents[n].reshape(1, -1)).sum(1) for n in names))
    return torch.cat(parts).detach()


def _exact_dots(model, x, y, tangents, loss_fn, primals, others) -> Tensor:
    def losses(p):
        out = _call(model, others, p, x)
        return _check_losses(loss_fn(out, y), x.shape[0])

    # primals are detached, so no reverse-mode graph is recorded.  The first
    # forward-AD call makes torch load jvp decompositions via the deprecated
    # torch.jit.script; silence that one internal DeprecationWarning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        _, dots = jvp(losses, (primals,), (tangents,))
    return dots.detach()


def _taylor_dots(model, x, y, tangents, loss_fn, primals, others, eps) -> Tensor:
    if eps <= 0:
        raise ValueError("eps must be positive")
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tangents.values()))
    if norm.item() == 0.0:
        return torch.zeros(x.shape[0], dtype=next(iter(primals.values())).dtype, device=x.device)
    step = eps / norm.item()  # θ + ε v̂ = θ + (ε/||v||) v
    shifted = {n: p + step * tangents[n] for n, p in primals.items()}
    with eval_mode(model, no_grad=True):
        l0 = _check_losses(loss_fn(_call(model, others, primals, x), y), x.shape[0])
        l1 = _check_losses(loss_fn(_call(model, others, shifted, x), y), x.shape[0])
    return (l1 - l0) / eps * norm.item()


_GHOST_TYPES = (nn.Linear, nn.Conv2d)


def _plain_forward(mod: nn.Module) -> bool:
    # subclasses that override forward (e.g. adapters) may not be linear in the weight
    return any(type(mod).forward is t.forward for t in _GHOST_TYPES)


def _ghost_dots(model, x, y, tangents, loss_fn, primals, others) -> Tensor:
    """Layer-wise dots without per-example gradients.

    A layer's output is linear in its weight, so for a layer with input ``a_i``,
    output gradient ``δ_i = ∂(Σ_j ℓ_j)/∂out_i = ∂ℓ_i/∂out_i`` and weight direction
    ``V``: ``∇_W ℓ_i · V = <δ_i, layer(a_i; weight=V, bias=0)>`` and
    ``∇_b ℓ_i · v_b = Σ_positions δ_i · v_b``.

    * Linear (input ``(B, *, D_in)``): ``Σ_t δ_i[t] · (V a_i[t])``.
    * Conv2d: the per-example weight gradient is ``Σ_p δ_i[p] ⊗ unfold(a_i)[p]``,
      so ``∇_W ℓ_i · V = Σ_p δ_i[p] · (V_mat @ unfold(a_i))[p]``.  ``V_mat @
      unfold(a_i)`` is exactly ``conv2d(a_i, V)`` (same stride/padding/dilation/
      groups/padding_mode), which is what is computed — the unfolded input
      (``C·k²`` times larger than ``a``) and the ``B × |W|`` matrix are never formed.

    Cost: one forward, one backward to the layer outputs, plus one extra
    (bias-free) layer evaluation per layer with ``V``.  Layers called several
    times, or sharing a tied weight, contribute once per call.
    """
    # which modules own trainable parameters, and are they supported?
    # canonical names: tied parameters appear once in named_parameters()
    canon = {id(p): n for n, p in model.named_parameters()}
    owners: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    for mname, mod in model.named_modules():
        local = {pn: canon[id(p)] for pn, p in mod.named_parameters(recurse=False)}
        local = {pn: full for pn, full in local.items() if full in tangents}
        if not local:
            continue
        if not (isinstance(mod, _GHOST_TYPES) and _plain_forward(mod)):
            raise NotImplementedError(
                f"ghost dot products support only nn.Linear and nn.Conv2d; module "
                f"{mname or '<root>'!r} of type {type(mod).__name__} has trainable parameters "
                f"{sorted(local)} (use method='exact')"
            )
        owners[mname] = (mod, local)
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
            raise NotImplementedError(
                f"ghost dot products need per-example independent losses; {type(mod).__name__} "
                f"{mname!r} uses batch statistics (put it in eval mode or use method='exact')"
            )

    records: list[tuple[str, Tensor, Tensor]] = []

    def make_hook(mname):
        def hook(mod, inputs, output):
            records.append((mname, inputs[0].detach(), output))

        return hook

    handles = [mod.register_forward_hook(make_hook(mn)) for mn, (mod, _) in owners.items()]
    B = x.shape[0]
    leaves = {n: p.clone().requires_grad_(True) for n, p in primals.items()}
    try:
        with torch.enable_grad():
            logits = _call(model, others, leaves, x)
            total = _check_losses(loss_fn(logits, y), B).sum()
    finally:
        for h in handles:
            h.remove()

    dtype = next(iter(primals.values())).dtype
    dots = torch.zeros(B, dtype=dtype, device=x.device)
    if not records:
        return dots
    outs = [o for _, _, o in records]
    with torch.enable_grad():
        gouts = torch.autograd.grad(total, outs, allow_unused=True)

    with torch.no_grad():
        for (mname, a, _), g in zip(records, gouts):
            if g is None:
                continue
            mod, local = owners[mname]
            if a.shape[0] != B or g.shape[0] != B:
                raise RuntimeError(
                    f"ghost: input/output of {mname!r} does not have the batch dimension first"
                )
            vw = tangents.get(local.get("weight", ""), None)
            vb = tangents.get(local.get("bias", ""), None)
            if isinstance(mod, nn.Linear):
                if vw is not None:
                    dots += (g * F.linear(a, vw)).reshape(B, -1).sum(1)
                if vb is not None:
                    dots += g.reshape(B, -1, g.shape[-1]).sum(1) @ vb
            else:  # nn.Conv2d
                if a.dim() != 4:
                    raise RuntimeError(f"ghost: Conv2d {mname!r} needs batched 4-D input, got {a.dim()}-D")
                if vw is not None:
                    dots += (g * mod._conv_forward(a, vw, None)).reshape(B, -1).sum(1)
                if vb is not None:
                    dots += g.sum(dim=(2, 3)) @ vb
    return dots


def second_order():
    """Context for code that differentiates twice (meta-gradients through a virtual step) or in forward mode:
    attention runs on PyTorch's math kernel, since the fused scaled-dot-product kernels have neither a double
    backward nor a forward-mode formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class LayerTape:
    """Records each Linear/Conv2d layer's input and output gradient during the model's own forward/backward,
    so that per-example dot products g_i . v come from that pass without a second one.

    A layer's output is linear in its weight, so grad_W l_i . V = <dl_i/dout_i, layer(a_i; weight=V, bias=0)>
    and grad_b l_i . v_b = sum over positions of dl_i/dout_i . v_b (the "ghost" identity of `per_example_dots`).
    The backward must be of a *sum* of per-row terms; `dots` then returns d(that sum)/d(row term) times
    grad l_i . v, i.e. each row's loss weight times its dot product. Use as a context manager around the pass.

    A model with BatchNorm is refused (NotImplementedError): its batch statistics couple the rows, so a split of
    the batch gradient into rows would not be grad l_i . v; dds, hostcp and lrdi use forward-mode dots for such
    models (`per_example_dots`).
    """

    def __init__(self, model: nn.Module):
        canon = {id(p): n for n, p in model.named_parameters()}
        self.names: dict[int, tuple[str, str | None]] = {}
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):  # its batch statistics couple the rows' gradients
                raise NotImplementedError(f"layer {mname!r} ({type(mod).__name__}) couples the rows of a batch")
        for mname, mod in model.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            if not own:
                continue
            if type(mod).forward not in (nn.Linear.forward, nn.Conv2d.forward, nn.modules.batchnorm._BatchNorm.forward):
                raise NotImplementedError(f"layer {mname!r} ({type(mod).__name__}) is not Linear/Conv2d/BatchNorm")
            self.names[id(mod)] = (canon[id(own["weight"])], canon[id(own["bias"])] if "bias" in own else None)
        self.modules = [m for m in model.modules() if id(m) in self.names]
        self.records: list[list] = []
        self.handles: list = []

    def _hook(self, mod, inputs, output):
        entry = [mod, inputs[0].detach(), None]
        self.records.append(entry)
        output.register_hook(lambda grad: entry.__setitem__(2, grad))

    def __enter__(self):
        self.records = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    @torch.no_grad()
    def dots(self, v: dict[str, Tensor], batch_size: int) -> Tensor:
        """Sum over recorded layers of <output gradient_i, layer_v(input_i)>, one number per row; frees the tape."""
        ref = next(iter(v.values()))
        out = torch.zeros(batch_size, dtype=ref.dtype, device=ref.device)
        for mod, a, grad in self.records:
            if grad is None:  # this layer's output did not reach the loss
                continue
            wname, bname = self.names[id(mod)]
            b = grad.shape[0]
            if isinstance(mod, nn.Linear):
                r = (grad * F.linear(a, v[wname])).reshape(b, -1).sum(1)
                if bname is not None:
                    r = r + grad.reshape(b, -1, grad.shape[-1]).sum(1) @ v[bname]
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                # the output is linear in (weight, bias): normalise the recorded input as the forward did
                # (batch statistics in training mode, else the running ones; nothing is updated) with weight
                # and bias replaced by v
                batch_stats = mod.training or mod.running_mean is None
                y_v = F.batch_norm(
                    a,
                    None if batch_stats else mod.running_mean,
                    None if batch_stats else mod.running_var,
                    v[wname],
                    None if bname is None else v[bname],
                    training=batch_stats,
                    eps=mod.eps,
                )
                r = (grad * y_v).reshape(b, -1).sum(1)
            else:
                r = (grad * mod._conv_forward(a, v[wname], None)).reshape(b, -1).sum(1)
                if bname is not None:
                    r = r + grad.sum((2, 3)) @ v[bname]
            out = out + r
        self.records = []
        return out

"""Channel smoothing for int8 (SmoothQuant's migration): what 8-bit activations lose to
a few wide channels, moved into the weights.

Per-token int8 rounds a token's every channel with one step, set by its widest channel.
Trained encoders carry a few channels far wider than the rest (RoBERTa's and XLM-R's
most of all), so the narrow channels keep only a few levels. For a linear y = x W^T + b
and a positive factor s_j per input channel, y = (x / s) (W s)^T + b exactly: dividing
channel j of the activations by s_j and multiplying column j of the weights by it
changes nothing in fp32, and with s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) the
activations' channels come closer in width while the weights' stay within reach of
their per-row int8 step.

The factors are the model's: measured once on its training text and stored in the
artifact (`smooth/<site>` in weights.safetensors), applied whenever the model is served
with 8-bit activations (`Int8Linear`, eager and in the ONNX Runtime graphs, the same
bits). A site is a linear as served: query, key and value share one (`qkv`), since they
read the same activations.
"""

from __future__ import annotations

import torch
from torch import nn

from app.network.encoder import SelfAttention
from app.network.multi_exit import MultiExitNetwork, pad_batch

FLOOR = 1e-5  # below this a channel or column counts as silent


def sites(network: nn.Module) -> dict[str, nn.Linear]:
    """The served linears by their served names, fused or not: an attention's query,
    key and value are one site, `<attention>.qkv`, read through the query (they share
    its input)."""
    out: dict[str, nn.Linear] = {}
    attention = {
        name: module
        for name, module in network.named_modules()
        if isinstance(module, SelfAttention)
    }
    for name, module in network.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if parent in attention and leaf in ("query", "key", "value"):
            if leaf == "query":
                out[f"{parent}.qkv"] = module
            continue
        out[name] = module
    return out


def served_sites(network: nn.Module) -> dict[str, nn.Linear]:
    """`sites` restricted to what int8 serving replaces: the encoder's and the heads'."""
    return {
        name: lin
        for name, lin in sites(network).items()
        if name.startswith(("encoder.encoder.", "heads."))
    }


@torch.inference_mode()
def channel_maxima(
    network: MultiExitNetwork, token_ids: list[list[int]], batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of every served site, over the rows run through the
    fp32 network at full depth (padding positions left out)."""
    served = served_sites(network)
    maxima = {name: torch.zeros(lin.in_features) for name, lin in served.items()}
    name_of = {id(lin): name for name, lin in served.items()}
    real: list[torch.Tensor] = []  # the batch's real-token positions, flattened (B * T,)

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float()
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == real[0].numel():  # token rows, not pooled ones: drop padding
            rows = rows[real[0]]
        if len(rows):
            name = name_of[id(module)]
            torch.maximum(maxima[name], rows.abs().amax(0), out=maxima[name])

    hooks = [lin.register_forward_pre_hook(record) for lin in served.values()]
    try:
        for start in range(0, len(token_ids), batch_size):
            ids, mask = pad_batch(token_ids[start : start + batch_size])
            real[:] = [mask.reshape(-1).bool()]
            network(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return maxima


def factors(
    network: nn.Module, maxima: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """s per site (in_features,), from the activations' channel maxima and the weights'
    column maxima: s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha); 1 where either is
    silent."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    out = {}
    for name, lin in served_sites(network).items():
        w = weight_of(network, name, lin).abs().amax(0)  # (K,)
        a = maxima[name]
        s = a.clamp(min=FLOOR).pow(alpha) / w.clamp(min=FLOOR).pow(1.0 - alpha)
        out[name] = torch.where((a > FLOOR) & (w > FLOOR), s, torch.ones_like(s)).float()
    return out


def weight_of(network: nn.Module, name: str, lin: nn.Linear) -> torch.Tensor:
    """A site's weight (N, K) as served: an unfused attention's query, key and value
    stacked, as `SelfAttention.fuse` stacks them."""
    parent = network.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, SelfAttention) and parent.qkv is None:
        stacked = [parent.query.weight, parent.key.weight, parent.value.weight]
        return torch.cat(stacked).detach().float()
    return lin.weight.detach().float()


def check(network: nn.Module, smoothing: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a model's stored factors, or None: each names a served site,
    has its input width, and is finite and positive."""
    known = served_sites(network)
    for name, s in smoothing.items():
        if name not in known:
            return f"smoothing for {name!r}, which is no served linear"
        if tuple(s.shape) != (known[name].in_features,):
            width = known[name].in_features
            return f"smoothing for {name!r} has shape {tuple(s.shape)}, expected ({width},)"
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            return f"smoothing for {name!r} holds a value that is not finite and positive"
    return None

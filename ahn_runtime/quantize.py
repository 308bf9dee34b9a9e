"""Weight quantization of the base model's decoder linears with bitsandbytes (4-bit nf4/fp4, 8-bit int8).

Only the linears inside the decoder layers (q/k/v/o projections and the MLP) are quantized; embeddings, norms,
the LM head and the AHN modules keep the model dtype, and memory states stay float32. The source model stays on
the CPU and goes to the device one linear at a time, quantized on the way (bitsandbytes quantizes when a
parameter moves to the device), so the device never holds the unquantized weights: a 7B model loads into an
8 GiB card.

    quantize_model(hf_model, "nf4", device="cuda", compute_dtype=torch.bfloat16)
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import AHNError

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


def bnb():
    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001  not installed, or no usable backend
        raise AHNError("4-bit and 8-bit weights need the bitsandbytes package (pip install bitsandbytes); "
                       f"it could not be imported: {e}") from e
    return bitsandbytes


def _quantized_linear(lin: nn.Linear, mode: str, device, compute_dtype: torch.dtype, double_quant: bool):
    b = bnb()
    has_bias = lin.bias is not None
    w = lin.weight.data.to(compute_dtype)
    if mode in ("nf4", "fp4"):
        new = b.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=mode, device="meta")
        new.weight = b.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type=mode)
    else:
        new = b.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        new.weight = b.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
    return new.to(device)


def quantize_model(hf_model: nn.Module, mode: str, device, compute_dtype: torch.dtype,
                   double_quant: bool = True) -> int:
    """Replace the decoder layers' nn.Linear modules by bitsandbytes ones on `device`, in place.
    Returns the number of linears replaced. The rest of the model is left where it is."""
    if mode not in QUANTIZATIONS or mode == "none":
        raise AHNError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {mode!r})")
    bnb()
    n = 0
    for layer in hf_model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _quantized_linear(child, mode, device, compute_dtype, double_quant))
                    del child
                    n += 1
    return n


def quantization_of(hf_model: nn.Module) -> str:
    """'nf4' / 'fp4' / 'int8' when the decoder linears are bitsandbytes modules, else 'none'."""
    for mod in hf_model.model.layers[0].modules():
        name = type(mod).__name__
        if name == "Linear4bit":
            return str(getattr(mod.weight, "quant_type", "nf4"))
        if name == "Linear8bitLt":
            return "int8"
    return "none"

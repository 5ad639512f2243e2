"""Model families (`ModelConfig.arch`): one module per family, one registry.

    llama.py   LLaMA; Mistral and Qwen2 without sliding window (Qwen2: add_qkv_bias)
    gpt2.py    GPT-2
    opt.py     OPT (pre-LN)
    base.py    ModelFamily (the spec every family module defines as FAMILY), HFMapping (the Hugging Face
               mapping base class) and the tensor helpers the mappings share (fuse_qkv, split_qkv, pad_rows)

A family module holds everything about its family: the Megatron model's options (normalization,
activation, gated MLP, biases, rope or learned positions, layer spec), its defaults and rules (FFN width,
tied embeddings, GQA, extra config checks), the planner's formula pieces (derived from those options)
and the Hugging Face mapping with its conversion special cases. The builder (models/builder.py), the
converter (conversion/convert.py), the planner (planner.py) and config validation ask `get_family(arch)`.

Adding a family: a new module defining `FAMILY = ModelFamily(...)` (and an `HFMapping` subclass for
conversion) plus one line in `REGISTRY` below, or, from outside the package (a plugin, a test),
`register_family(FAMILY)` before the config is loaded.

Nothing here imports torch or Megatron at import time (mgsr_megatron.config reads the registry).
"""

from __future__ import annotations

from mgsr_megatron.architectures import gpt2, llama, opt
from mgsr_megatron.architectures.base import HFMapping, ModelFamily, fuse_qkv, pad_rows, split_qkv
from mgsr_megatron.errors import UserError

REGISTRY: dict[str, ModelFamily] = {
    "llama": llama.FAMILY,
    "gpt2": gpt2.FAMILY,
    "opt": opt.FAMILY,
}


def family_names() -> tuple[str, ...]:
    """The registered family names (ModelConfig.arch values), in registration order."""
    return tuple(REGISTRY)


def get_family(name: str) -> ModelFamily:
    """The family `name`, or a one-line error listing the registered ones."""
    family = REGISTRY.get(name)
    if family is None:
        raise UserError(f"model arch '{name}' is not supported (supported: {', '.join(REGISTRY)})")
    return family


def register_family(family: ModelFamily, replace: bool = False) -> ModelFamily:
    """Add `family` to the registry (ModelConfig.arch = family.name); returns it.

    Refused: a non-ModelFamily, a name already registered (unless replace=True) and Hugging Face
    architecture names another family already imports."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family expects a ModelFamily, got {type(family).__name__}")
    if family.name in REGISTRY and not replace:
        raise ValueError(f"model family '{family.name}' is already registered (pass replace=True)")
    if family.hf is not None:
        claimed = {hf: other.name for other in REGISTRY.values() if other.name != family.name and other.hf
                   for hf in other.hf.hf_architectures}
        taken = [hf for hf in family.hf.hf_architectures if hf in claimed]
        if taken:
            raise ValueError(f"Hugging Face architecture(s) {', '.join(taken)} already belong to model family "
                             f"'{claimed[taken[0]]}'")
    REGISTRY[family.name] = family
    return family


def unregister_family(name: str) -> ModelFamily:
    """Remove a registered family (a plugin's or a test's); returns it."""
    if name not in REGISTRY:
        raise KeyError(f"model family '{name}' is not registered")
    return REGISTRY.pop(name)


def hf_architectures() -> dict[str, ModelFamily]:
    """Every Hugging Face architecture name (config.json "architectures") the registry imports -> its family."""
    return {hf: family for family in REGISTRY.values() if family.hf is not None for hf in family.hf.hf_architectures}


def for_hf_config(hf: dict):
    """(family, ModelConfig) of a Hugging Face config.json, or a one-line error listing the supported names."""
    supported = hf_architectures()
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in supported:
        shown = ", ".join(names) if names else f"none (model_type={hf.get('model_type')!r})"
        raise UserError(f"config.json: architecture {shown} is not supported "
                        f"(supported: {', '.join(supported)})")
    family = supported[names[0]]
    return family, family.hf.model_config(hf)


__all__ = ["REGISTRY", "ModelFamily", "HFMapping", "family_names", "get_family", "register_family",
           "unregister_family", "hf_architectures", "for_hf_config", "fuse_qkv", "split_qkv", "pad_rows"]

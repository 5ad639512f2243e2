"""Hugging Face model directories: lazy reading of config.json + weights, streaming writing.

Reading: safetensors files are opened with `safe_open` (memory-mapped); a tensor is copied into
memory only when asked for. `pytorch_model.bin` files are opened with `torch.load(mmap=True,
weights_only=True)`, so they are memory-mapped too (pickles never run code).
Writing: one safetensors file per group of tensors (embeddings, each layer, the head) plus
`model.safetensors.index.json`, so the writer holds one layer at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mgsr_megatron.errors import UserError

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"  # the model's, not the tokenizer's: kept beside the weights


class HFCheckpoint:
    """An HF model directory: `config` (dict), `shapes` {name: shape} and `get(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"--hf-path {self.path}: directory not found")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise UserError(f"--hf-path {self.path}: no config.json (not a Hugging Face model directory)")
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{config_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._index_weights()

    def _index_weights(self) -> None:
        from safetensors import safe_open

        candidates = [(self.path / INDEX, "safetensors"), (self.path / "model.safetensors", "safetensors"),
                      (self.path / "pytorch_model.bin.index.json", "bin"), (self.path / "pytorch_model.bin", "bin")]
        found = [(file, kind) for file, kind in candidates if file.is_file()]
        if not found:
            raise UserError(f"--hf-path {self.path}: no weights (model.safetensors, {INDEX}, "
                            f"pytorch_model.bin or pytorch_model.bin.index.json)")
        file, kind = found[0]
        if file.suffix == ".json":
            try:
                weight_map = json.loads(file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{file}: not a weight index (needs a 'weight_map')") from exc
            files = sorted({self.path / name for name in weight_map.values()})
        else:
            files = [file]
        for shard in files:
            if not shard.is_file():
                raise UserError(f"{file}: names missing weight file {shard.name}")
            if kind == "safetensors":
                handle = safe_open(str(shard), framework="pt")
                for name in handle.keys():
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())
                    self._files[name] = shard
            else:
                try:
                    handle = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - a pickle that needs code, or not a zip file
                    raise UserError(f"{shard}: cannot be read with weights_only=True ({exc})".split("\n")[0]) from None
                for name, tensor in handle.items():
                    self.shapes[name] = tuple(tensor.shape)
                    self._files[name] = shard
            self._handles[shard] = handle

    def get(self, name: str) -> torch.Tensor:
        handle = self._handles[self._files[name]]
        if isinstance(handle, dict):
            return handle[name].clone()  # out of the memory map
        return handle.get_tensor(name)

    def copy_tokenizer(self, destination: Path) -> list[str]:
        """The tokenizer's files, when there is a vocabulary among them (configs alone are no tokenizer:
        `destination` is then not created)."""
        from mgsr_megatron.data.tokenizer import has_tokenizer_files

        if not has_tokenizer_files(self.path):
            return []
        files = [name for name in TOKENIZER_FILES if (self.path / name).is_file()]
        if files:
            destination.mkdir(parents=True, exist_ok=True)
            for name in files:
                (destination / name).write_bytes((self.path / name).read_bytes())
        return files


class HFWriter:
    """Writes `model-XXXXX-of-YYYYY.safetensors` files one group at a time, then the index."""

    def __init__(self, directory: Path, num_files: int):
        self.directory = Path(directory)
        self.num_files = num_files
        self.written = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.written += 1
        name = f"model-{self.written:05d}-of-{self.num_files:05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")

"""Load an HF-format MPT checkpoint (local dir or hub id) into `Mpt` on the target device and dtype.

The model is built on the meta device; each checkpoint tensor is then read (safetensors: straight
from the mmap'd file; .bin: torch.load with mmap), converted to the target device/dtype and assigned,
one tensor at a time, so host memory never holds a full-precision copy of the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pipeline.engine.attention import AttentionBackend
from pipeline.engine.backends import select_backend
from pipeline.engine.config import MptConfig
from pipeline.engine.model import Mpt
from pipeline.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json"]
BIN_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]


class CheckpointError(ValueError):
    """The checkpoint is missing, incomplete or does not match its config."""


def resolve_checkpoint(spec: str | Path) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub (when reachable)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(spec).startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory not found: {spec}")
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a declared dependency
        raise CheckpointError(f"{spec} is not a directory and huggingface_hub is not installed") from exc
    try:  # the local hub cache first: no network round trips (or retries) when it is already there
        cached = Path(snapshot_download(str(spec), allow_patterns=WEIGHT_PATTERNS + BIN_PATTERNS,
                                        local_files_only=True))
        if (cached / "config.json").is_file():
            return cached
    except Exception:  # not cached: fall through to the hub
        log.debug("%s not in the local hub cache", spec)
    try:
        files = list_repo_files(str(spec))
        patterns = WEIGHT_PATTERNS + ([] if any(f.endswith(".safetensors") for f in files) else BIN_PATTERNS)
        return Path(snapshot_download(str(spec), allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(f"could not fetch {spec!r} from the hub: {exc}") from exc


def _weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not found:
        raise CheckpointError(f"no weights (*.safetensors or *.bin) in {directory}")
    return found


def iter_checkpoint_tensors(directory: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard; safetensors tensors are read onto `device`."""
    from safetensors import safe_open

    for file in _weight_files(directory):
        if not file.is_file():
            raise CheckpointError(f"weight shard listed in the index is missing: {file.name}")
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
        else:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # legacy (non-zip) .bin files cannot be mmap'd; one shard in memory
                state = torch.load(file, map_location="cpu", weights_only=True)
            for name in list(state):
                yield name, state.pop(name)
            del state


def _assign(model: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def load_model(
    directory: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_seq_len: int | None = None,
    backend: AttentionBackend | str | None = None,
) -> Mpt:
    """Build `Mpt` from config.json and the weights in `directory` on `device` in `dtype`."""
    device = torch.device(device)
    config = MptConfig.from_json(directory / "config.json", max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Mpt(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for raw_name, tensor in iter_checkpoint_tensors(directory, device):
        name = raw_name.removeprefix("transformer.")
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to wte; some exporters write the copy anyway
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {raw_name!r} for this config")
        if tensor.shape != expected[name]:
            raise CheckpointError(f"{raw_name}: shape {tuple(tensor.shape)} != expected {tuple(expected[name])}")
        _assign(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
        del tensor
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.reset_slopes(device)
    if isinstance(backend, AttentionBackend):
        model.backend = backend
    else:
        model.backend = select_backend(device, backend)
    log.info("loaded MPT %s (%d layers, d_model %d) on %s/%s, attention %s", directory.name,
             config.n_layers, config.d_model, device, dtype, model.backend.name)
    return model.eval()


def load(
    spec: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_seq_len: int | None = None,
    backend: AttentionBackend | str | None = None,
) -> tuple[Mpt, Tokenizer]:
    """Model and tokenizer from a checkpoint dir or hub id."""
    directory = resolve_checkpoint(spec)
    model = load_model(directory, device=device, dtype=dtype, max_seq_len=max_seq_len, backend=backend)
    return model, Tokenizer.from_dir(directory, eos_token_id=model.config.eos_token_id)

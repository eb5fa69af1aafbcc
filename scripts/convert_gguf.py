#!/usr/bin/env python3
"""Write a Hugging Face (bf16 safetensors) copy of a GGUF model beside it, for vLLM, which cannot read GGUF.

transformers reads the GGUF (dequantising it); the copy goes to `<name>-hf/` next to the file, where the
vLLM engine looks for it. Idempotent: an existing copy is left alone. Needs the transformers extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.fetch_model import MEMBER, default_models_dir  # noqa: E402


def convert(gguf: Path) -> Path:
    target = gguf.with_name(gguf.stem + "-hf")
    if (target / "config.json").exists():
        print(f"converted model already present: {target}")
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to {target} (bf16) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are plain bf16 now; without this, save_pretrained would record the GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".part")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)  # a half-written copy never looks complete
    print(f"converted model ready: {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, nargs="?", default=default_models_dir() / Path(MEMBER).name)
    convert(parser.parse_args().gguf)


if __name__ == "__main__":
    main()

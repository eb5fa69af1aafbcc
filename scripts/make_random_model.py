"""Makes a Llama-architecture model with random weights (throughput does not depend on the weights'
values) from a transformers config, with the default SmolLM2 model's tokenizer, as a Hugging Face
directory (OUT_DIR/hf, what vLLM reads) and, given the llama.cpp source vendored in llama-cpp-python's
sdist, as an f16 GGUF too (convert_hf_to_gguf.py). Used for the GPU runs of benchmarks 1 and 2, where no
model hub is reachable. Needs torch and transformers.

Usage: make_random_model.py TOKENIZER OUT_DIR [LLAMA_CPP_SOURCE]
  TOKENIZER: a tokenizer directory (the default model's `-hf` copy) or a GGUF holding the tokenizer
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

# Llama-3.2-1B's shape with SmolLM2's 49,152-token vocabulary: 1.07 B parameters.
SHAPE = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
)


def load_tokenizer(path: Path):
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def save_hf_model(tokenizer_path: Path, hf_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.save_pretrained(hf_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPE
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B", flush=True)
    model.save_pretrained(hf_dir)


def convert(source: Path, hf_dir: Path, outfile: Path) -> None:
    """Runs in a fresh process (see main): the script needs its own gguf-py, not the PyPI gguf that
    transformers loaded to read the tokenizer."""
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outtype", "f16", "--outfile", str(outfile)]
    import convert_hf_to_gguf
    from conversion.base import TextModel
    from conversion.llama import LlamaModel

    # The tokenizer is SmolLM2's byte-level BPE, rebuilt by transformers from GGUF metadata: write it
    # as BPE (the Llama converter would try SentencePiece-style first), and name its pre-tokenizer,
    # whose fingerprint can differ from the one the script lists for the original files.
    LlamaModel.set_vocab = TextModel._set_vocab_gpt2
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
    convert_hf_to_gguf.main()


def main() -> None:
    if sys.argv[1] == "--convert":
        convert(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return
    tokenizer_path, out_dir, *source = (Path(a) for a in sys.argv[1:4])
    hf_dir = out_dir / "hf"
    if not (hf_dir / "model.safetensors").exists():
        save_hf_model(tokenizer_path, hf_dir)
    if not source:
        return
    outfile = out_dir / "random-llama-1b-f16.gguf"
    subprocess.run([sys.executable, __file__, "--convert", str(source[0]), str(hf_dir), str(outfile)], check=True)


if __name__ == "__main__":
    main()

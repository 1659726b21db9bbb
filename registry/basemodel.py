"""What the registry knows of a base model: its fingerprint and its parameter shapes.

The fingerprint is a sha256 over the model config (without fields that change when the
same model is saved by another library version), the tokenizer files and the weight files,
so an adapter can be tied to exactly the base it was trained on. Parameter shapes come from
the safetensors headers: validating an adapter never loads the base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from registry.artifacts import sha256_file
from registry.errors import AdapterWeightsError, InvalidBaseModel
from registry.tensors import read_header

# Fields a re-save may change without changing the model.
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class BaseModelInfo:
    """A base model as the registry records it (JSON-serialisable through `to_dict`)."""

    fingerprint: str
    path: str
    model_type: str
    # parameter name -> shape, e.g. "model.layers.0.self_attn.q_proj.weight" -> (64, 64)
    params: dict[str, tuple[int, ...]] = field(repr=False)
    tokenizer_hash: str | None = None
    chat_template_hash: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint,
            "path": self.path,
            "model_type": self.model_type,
            "params": {k: list(v) for k, v in self.params.items()},
            "tokenizer_hash": self.tokenizer_hash,
            "chat_template_hash": self.chat_template_hash,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BaseModelInfo:
        params = data["params"]
        assert isinstance(params, dict)
        return cls(
            fingerprint=str(data["fingerprint"]),
            path=str(data["path"]),
            model_type=str(data["model_type"]),
            params={k: tuple(v) for k, v in params.items()},
            tokenizer_hash=_opt_str(data.get("tokenizer_hash")),
            chat_template_hash=_opt_str(data.get("chat_template_hash")),
        )

    def module_shapes(self) -> dict[str, tuple[int, ...]]:
        """Module name -> weight shape for modules with a 2-D weight (linear and embedding)."""
        return {
            name.removesuffix(".weight"): shape
            for name, shape in self.params.items()
            if name.endswith(".weight") and len(shape) == 2
        }


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _read_config(base_dir: Path) -> dict[str, object]:
    path = base_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InvalidBaseModel(
            f"base model {base_dir} has no config.json; point at a Hugging Face model directory "
            "(or build one with `lorafleet base tiny --out DIR`)"
        ) from err
    except (OSError, ValueError) as err:
        raise InvalidBaseModel(f"cannot read base model config {path}: {err}") from err
    if not isinstance(config, dict):
        raise InvalidBaseModel(f"base model config {path} is not a JSON object")
    return config


def _weight_files(base_dir: Path) -> list[Path]:
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in base_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found pickle files {', '.join(pickles)})" if pickles else ""
        raise InvalidBaseModel(
            f"base model {base_dir} has no .safetensors weights{found}; lorafleet reads only "
            "safetensors: re-save it with model.save_pretrained(DIR, safe_serialization=True)"
        )
    return files


def _chat_template(base_dir: Path) -> str | None:
    jinja = base_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config_path = base_dir / "tokenizer_config.json"
    if config_path.is_file():
        try:
            template = json.loads(config_path.read_text()).get("chat_template")
        except ValueError:
            return None
        return template if isinstance(template, str) else None
    return None


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# sha256 of base weight files by (path, inode, size, mtime, ctime): a base is hashed once per
# process, not at every registration (ctime changes on any write and cannot be set back).
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def _weights_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def inspect_base(base_dir: Path | str) -> BaseModelInfo:
    """Fingerprint a base model directory and read its parameter shapes."""
    base_dir = Path(base_dir).expanduser().resolve()
    if not base_dir.is_dir():
        raise InvalidBaseModel(f"base model directory {base_dir} does not exist")
    config = _read_config(base_dir)
    digest = hashlib.sha256()
    stable = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    digest.update(b"config\0" + json.dumps(stable, sort_keys=True).encode() + b"\0")

    tokenizer = hashlib.sha256()
    has_tokenizer = False
    for name in TOKENIZER_FILES:
        path = base_dir / name
        if path.is_file():
            has_tokenizer = True
            tokenizer.update(name.encode() + b"\0" + sha256_file(path).encode() + b"\0")
    tokenizer_hash = tokenizer.hexdigest() if has_tokenizer else None
    template = _chat_template(base_dir)
    chat_template_hash = hash_text(template) if template is not None else None
    digest.update(f"tokenizer\0{tokenizer_hash}\0chat\0{chat_template_hash}\0".encode())

    params: dict[str, tuple[int, ...]] = {}
    for path in _weight_files(base_dir):
        digest.update(path.name.encode() + b"\0" + _weights_digest(path).encode() + b"\0")
        try:
            header = read_header(path)
        except AdapterWeightsError as err:
            raise InvalidBaseModel(f"base model weights are unreadable: {err}") from err
        params.update({name: info.shape for name, info in header.items()})
    _add_tied_head(config, params)
    return BaseModelInfo(
        fingerprint=digest.hexdigest(),
        path=str(base_dir),
        model_type=str(config.get("model_type", "unknown")),
        params=params,
        tokenizer_hash=tokenizer_hash,
        chat_template_hash=chat_template_hash,
    )


def _add_tied_head(config: dict[str, object], params: dict[str, tuple[int, ...]]) -> None:
    """A tied lm_head is not stored; it has the embedding's shape."""
    if "lm_head.weight" in params or not config.get("tie_word_embeddings", False):
        return
    for name, shape in params.items():
        if name.endswith("embed_tokens.weight"):
            params["lm_head.weight"] = shape
            return


def fetch_base(url: str, out: Path, expected: str | None = None) -> BaseModelInfo:
    """Copy the base model directory at an fsspec `url` (s3://, gs://, az://, file://) to
    `out`, through a temporary directory renamed into place once its fingerprint is
    `expected` (when given: a registry's base). An `out` that already holds that base is
    kept as it is. InvalidBaseModel naming both fingerprints on a mismatch."""
    import shutil
    import uuid

    import fsspec

    out = Path(out).expanduser().absolute()
    if out.is_dir() and expected is not None:
        try:
            present = inspect_base(out)
        except InvalidBaseModel:
            present = None
        if present is not None and present.fingerprint == expected:
            return present
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    names = [Path(p).name for p in fs.ls(root, detail=False) if fs.isfile(p)]
    if "config.json" not in names:
        raise InvalidBaseModel(
            f"{url} holds no config.json ({len(names)} files): give the URL of a base model "
            "directory (config.json, tokenizer and safetensors weights)"
        )
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for name in names:
            fs.get_file(f"{root}/{name}", str(staging / name))
        info = inspect_base(staging)
        if expected is not None and info.fingerprint != expected:
            raise InvalidBaseModel(
                f"the base at {url} has fingerprint {info.fingerprint}, but the registry is "
                f"bound to {expected}: point at the base the registry was created with"
            )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return inspect_base(out)

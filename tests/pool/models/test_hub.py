"""The model cache and ``helixflow pull``: names, paths, hashes, atomic installs, the CLI."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helixflow.errors import ModelLoadError
from helixflow.pool.models import hub

SMOLLM = "SmolLM2-135M-Instruct"
MINILM = "all-MiniLM-L6-v2"


def _fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy_from: Path | None) -> Path:
    """A private HELIXFLOW_HOME, optionally seeded with a copy of the shared cache's MiniLM."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    if copy_from is not None:
        shutil.copytree(copy_from / "models" / MINILM, home / "models" / MINILM)
    monkeypatch.setenv("HELIXFLOW_HOME", str(home))
    return home


def _cache_entries(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir())


def test_registry_pins_every_file() -> None:
    for model in hub.KNOWN_MODELS.values():
        assert model.files
        for file in model.files:
            assert len(file.sha256) == 64 and int(file.sha256, 16) >= 0
            assert file.size > 0
    assert hub.KNOWN_MODELS[SMOLLM].format == "gguf"
    assert hub.KNOWN_MODELS[MINILM].format == "hf"


def test_models_dir_follows_helixflow_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HELIXFLOW_HOME", str(tmp_path))
    assert hub.models_dir() == tmp_path / "models"
    monkeypatch.delenv("HELIXFLOW_HOME")
    assert hub.models_dir() == Path.home() / ".cache" / "helixflow" / "models"


def test_unknown_name_lists_known_models(use_home: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        hub.resolve_model("no-such-model")
    assert "no-such-model" in info.value.message
    assert SMOLLM in info.value.message and MINILM in info.value.message
    with pytest.raises(ModelLoadError, match="known models are"):
        hub.pull("no-such-model")


def test_paths_are_used_as_is(smollm_path: Path, minilm_path: Path, tmp_path: Path) -> None:
    assert hub.resolve_model(smollm_path) == smollm_path.resolve()
    assert hub.resolve_model(str(minilm_path)) == minilm_path.resolve()
    assert hub.pull(str(smollm_path), force=True) == smollm_path.resolve()  # nothing downloaded
    with pytest.raises(ModelLoadError, match="no such model file"):
        hub.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="no such model file"):
        hub.resolve_model(tmp_path / "missing-dir")
    text_file = tmp_path / "weights.bin"
    text_file.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="unsupported model file"):
        hub.resolve_model(text_file)


def test_known_names_resolve_in_the_cache(use_home: Path, smollm_path: Path) -> None:
    assert hub.resolve_model(SMOLLM, pull_if_missing=False) == smollm_path
    assert hub.resolve_model(SMOLLM.lower(), pull_if_missing=False) == smollm_path
    assert hub.resolve_model(MINILM) == use_home / "models" / MINILM
    listed = {m.name: m for m in hub.list_models()}
    assert listed[SMOLLM].path == smollm_path
    assert listed[SMOLLM].size == smollm_path.stat().st_size


def test_missing_model_without_pull_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fresh_home(tmp_path, monkeypatch, copy_from=None)
    with pytest.raises(ModelLoadError, match=f"run `helixflow pull {SMOLLM}`"):
        hub.resolve_model(SMOLLM, pull_if_missing=False)
    assert all(m.path is None for m in hub.list_models())


def test_corrupt_cache_is_detected_and_force_repairs(
    model_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _fresh_home(tmp_path, monkeypatch, copy_from=model_home)
    config = home / "models" / MINILM / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b"384", b"385"))  # same size, other bytes
    for action in (lambda: hub.resolve_model(MINILM), lambda: hub.pull(MINILM, quiet=True)):
        with pytest.raises(ModelLoadError) as info:
            action()
        assert "corrupt" in info.value.message and str(config) in info.value.message
        assert f"helixflow pull --force {MINILM}" in info.value.message

    config.write_bytes(original)
    (home / "models" / MINILM / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="is missing"):
        hub.resolve_model(MINILM)

    repaired = hub.pull(MINILM, force=True, quiet=True)
    assert repaired == home / "models" / MINILM
    assert hub.resolve_model(MINILM, pull_if_missing=False) == repaired
    assert _cache_entries(home) == [MINILM]


def _fail_mid_extract(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make extraction raise once a few MB are on disk, the way a crash or Ctrl-C would."""
    original = hub._Progress.update

    def update(self: hub._Progress, num_bytes: int) -> None:
        original(self, num_bytes)
        if self.done > 3_000_000:
            raise KeyboardInterrupt

    monkeypatch.setattr(hub._Progress, "update", update)


def test_interrupted_pull_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _fresh_home(tmp_path, monkeypatch, copy_from=None)
    _fail_mid_extract(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(MINILM, quiet=True)
    assert _cache_entries(home) == []  # neither a model nor a .partial-* leftover
    with pytest.raises(ModelLoadError, match="not in the cache"):
        hub.resolve_model(MINILM, pull_if_missing=False)


def test_interrupted_force_pull_keeps_the_old_copy(
    model_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _fresh_home(tmp_path, monkeypatch, copy_from=model_home)
    _fail_mid_extract(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(MINILM, force=True, quiet=True)
    assert _cache_entries(home) == [MINILM]
    assert hub.resolve_model(MINILM, pull_if_missing=False) == home / "models" / MINILM


def test_a_wheel_that_does_not_match_its_pin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _fresh_home(tmp_path, monkeypatch, copy_from=None)
    model = hub.KNOWN_MODELS[MINILM]
    wrong = dataclasses.replace(model.files[0], sha256="0" * 64)
    tampered = dataclasses.replace(model, files=(wrong, *model.files[1:]))
    monkeypatch.setitem(hub.KNOWN_MODELS, MINILM, tampered)
    with pytest.raises(ModelLoadError, match="does not match its pinned sha256"):
        hub.pull(MINILM, quiet=True)
    assert _cache_entries(home) == []


def test_progress_bar_draws_only_when_enabled() -> None:
    out = io.StringIO()
    bar = hub._Progress("extracting x", 2_000_000, enabled=True, stream=out)
    bar.update(1_000_000)
    bar.update(1_000_000)
    bar.close()
    lines = out.getvalue().split("\r")
    assert "50%" in lines[1] and "2.0/2.0 MB 100%" in lines[2] and out.getvalue().endswith("\n")
    quiet = io.StringIO()
    bar = hub._Progress("extracting x", 10, enabled=False, stream=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""


def _run_cli(*args: str, home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELIXFLOW_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "helixflow", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_pull_prints_the_path(model_home: Path, tmp_path: Path) -> None:
    result = _run_cli("pull", MINILM, home=model_home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{model_home / 'models' / MINILM}\n"
    assert result.stderr == ""  # already cached: nothing to say


def test_cli_pull_downloads_with_a_message(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = _run_cli("pull", MINILM, home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(home / "models" / MINILM)
    assert result.stderr.startswith(f"pulling {MINILM} (91 MB) into {home / 'models' / MINILM}")
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pull", "no-such-model"], "unknown model 'no-such-model'"),
        (["pull", "--force", "missing/model.gguf"], "no such model file or directory"),
    ],
)
def test_cli_pull_errors_are_one_line(
    args: list[str], message: str, model_home: Path, tmp_path: Path
) -> None:
    result = _run_cli(*args, home=model_home, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("helixflow pull: error:")
    assert message in result.stderr

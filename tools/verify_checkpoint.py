"""Check checkpoints against their manifests (size and SHA-256 of every file), without loading them;
or sign one you trust.

    python tools/verify_checkpoint.py runs/gift/checkpoints                  # every checkpoint of a run
    python tools/verify_checkpoint.py runs/gift/checkpoints/step_00000042    # one checkpoint
    python tools/verify_checkpoint.py /models/qwen-mcore/weights             # a converted checkpoint
    python tools/verify_checkpoint.py --sign runs/gift/checkpoints/step_00000042

Prints one line per checkpoint (OK, DAMAGED with each bad file, or UNVERIFIED when it has no
manifest) and exits 1 when any is damaged or unverified, 0 when all are intact. The trainer loads
only checkpoints that verify; `--sign DIR` writes a new manifest for the files DIR holds now, which
is how a user vouches for a checkpoint that does not verify (e.g. one whose manifest was lost). It
holds the run folder's lock while it writes: refused while a run uses that folder. Needs no GPU and
does not import megatron: it can run on a login node or a storage host.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_megatron.manifest import MANIFEST, sign_folder, verify_folder  # noqa: E402
from gift_megatron.run_dir import RunDirBusy, RunLock, owning_run_dir  # noqa: E402


def checkpoints_in(path: Path) -> list[Path]:
    if (path / "metadata.json").exists() or (path / MANIFEST).exists():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) if path.is_dir() else []
    return [p for p in found if (p / "metadata.json").exists() or (p / MANIFEST).exists()]


def verify(paths: list[Path]) -> int:
    bad = 0
    for root in paths:
        folders = checkpoints_in(root)
        if not folders:
            print(f"{root}: no checkpoint here (expected a folder with metadata.json, or one holding such folders)")
            bad += 1
        for folder in folders:
            start = time.perf_counter()
            problems = verify_folder(folder)
            took = time.perf_counter() - start
            if not problems:
                print(f"OK         {folder} ({took:.2f} s)")
            elif not (folder / MANIFEST).exists():
                print(f"UNVERIFIED {folder}: no {MANIFEST}; if you trust it: {Path(sys.argv[0]).name} --sign {folder}")
            else:
                print(f"DAMAGED    {folder}\n  " + "\n  ".join(problems))
            bad += bool(problems)
    return 1 if bad else 0


def sign(folder: Path) -> int:
    if not (folder / "metadata.json").exists():
        print(f"{folder}: not a checkpoint (no metadata.json): nothing signed")
        return 1
    try:
        with RunLock(owning_run_dir(folder)).acquire(f"verify_checkpoint --sign {folder}"):
            for problem in verify_folder(folder):
                print(f"was: {problem}")
            sign_folder(folder)
    except RunDirBusy as e:
        print(f"not signed: {e}")
        return 1
    print(f"SIGNED     {folder}: its manifest now vouches for the files it holds")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="checkpoint folders, or folders holding them")
    ap.add_argument("--sign", action="store_true", help="write a new manifest for each given checkpoint folder")
    args = ap.parse_args(argv)
    if args.sign:
        return max(sign(p) for p in args.paths)
    return verify(args.paths)


if __name__ == "__main__":
    sys.exit(main())

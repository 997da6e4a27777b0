"""Generate what the service loads from protos/.

    python protos/generate.py service/api/pb           # write the stubs
    python protos/generate.py --check service/api/pb   # exit 1 if the committed stubs are stale

- rnnserve/**: Python gRPC stubs with type stubs. protoc writes absolute imports
  (`from rnnserve.v1 import ...`); they are rewritten to relative ones so the stubs live inside the
  `service` package without touching sys.path.
- inference/** (the KServe v2 / Triton protocol): a descriptor set, `inference.binpb`. The service builds
  its message classes from it in a descriptor pool of its own: generated modules would register
  `inference.*` in the default pool, where `tritonclient` registers the same names.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
KSERVE_DESCRIPTORS = "inference.binpb"
_ABSOLUTE_IMPORT = re.compile(r"^from rnnserve\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency: imported only when generating

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "rnnserve").rglob("*.proto"))
    kserve = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "inference").rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stubs = [
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    descriptors = [f"--descriptor_set_out={out_dir / KSERVE_DESCRIPTORS}", "--include_imports", *kserve]
    for args in (stubs, descriptors):
        if protoc.main(["protoc", f"-I{PROTO_ROOT}", *args]) != 0:
            raise SystemExit("protoc failed")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = _ABSOLUTE_IMPORT.sub("from . import ", path.read_text())
        path.write_text(text)
        written.append(path)
    for package in {p.parent for p in written} | {out_dir}:
        while package != out_dir.parent:
            (package / "__init__.py").touch()
            package = package.parent
    (out_dir / "py.typed").touch()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="compare with a fresh generation")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(args.out_dir, ignore_errors=True)
        generate(args.out_dir)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / args.out_dir.name
        generate(fresh)
        stale = [
            str(p.relative_to(fresh))
            for p in fresh.rglob("*")
            if p.is_file()
            and not (args.out_dir / p.relative_to(fresh)).is_file()
            or p.is_file()
            and not filecmp.cmp(p, args.out_dir / p.relative_to(fresh), shallow=False)
        ]
    if stale:
        print(f"stale generated stubs (run `make protos`): {', '.join(sorted(stale))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

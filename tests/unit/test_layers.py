"""Dependencies point one way: server -> containers -> engine -> image, kernel.

Read from the source with ast, so the rule is checked without importing
anything (and without privilege).
"""

from __future__ import annotations

import ast
from pathlib import Path

import ckptd

ROOT = Path(ckptd.__file__).resolve().parent
# Which of our layers each layer may import. errors/logs/native/v1 are shared leaves.
LEAVES = {"errors", "logs", "v1"}
ALLOWED = {
    "kernel": set(),
    "image": LEAVES | {"native"},   # its checksum
    "engine": LEAVES | {"image", "kernel", "native"},
    "containers": LEAVES | {"image", "kernel", "native", "engine"},
    "server": LEAVES | {"image", "kernel", "native", "engine", "containers"},
}


def ckptd_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ckptd" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_layers_point_one_way() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in (ROOT / layer).rglob("*.py"):
            extra = ckptd_imports(path) - allowed - {layer}
            if extra:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_client_talks_only_grpc() -> None:
    client = Path(ckptd.__file__).resolve().parent.parent / "client"
    if not client.is_dir():  # installed without the source tree
        import ckptd_client
        client = Path(ckptd_client.__file__).parent
    for path in client.rglob("*.py"):
        assert ckptd_imports(path) <= {"v1", "image", "errors"}, path

"""Build steps that plain setuptools cannot express in pyproject.toml.

1. Generate the protobuf/gRPC modules from proto/ckptd/v1/*.proto into
   ckptd/v1/ (not in git: built, never hand-edited).
2. Compile the native C sources under ckptd/native/ into ckptd/native/bin/
   (not in git either), see ckptd/native/build.py for the list and flags.
3. Build the extension module ckptd.native._crc32 (the image checksum).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> None:
    from grpc_tools import protoc
    import grpc_tools

    proto_root = os.path.join(HERE, "proto")
    out = HERE
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(os.path.join(proto_root, "ckptd"))
        for f in names if f.endswith(".proto")
    )
    for path in files:
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}", path,
        ])
        if rc != 0:
            sys.exit(f"protoc failed on {path}")
    init = os.path.join(HERE, "ckptd", "v1", "__init__.py")
    if not os.path.exists(init):
        with open(init, "w") as f:
            f.write('"""Generated protobuf/gRPC code for proto/ckptd/v1 (built, not in git)."""\n')


def compile_native() -> None:
    sys.path.insert(0, os.path.join(HERE, "ckptd", "native"))
    try:
        import build as native_build  # ckptd/native/build.py
    finally:
        sys.path.pop(0)
    native_build.build_all(os.path.join(HERE, "ckptd", "native"))


class BuildPy(build_py):
    def run(self) -> None:
        compile_native()
        super().run()


class NativeDistribution(Distribution):
    """The package carries a compiled x86-64 binary (the restore stub): its
    wheel must say which platform it is for, not py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


# The image checksum, over every byte of a dump and a restore (crc32.c).
CRC32 = Extension("ckptd.native._crc32", ["ckptd/native/crc32.c"],
                  extra_compile_args=["-O2", "-Wall", "-Werror"])


# Generated before setup() so that package discovery finds ckptd.v1.
generate_protos()
setup(
    cmdclass={"build_py": BuildPy},
    distclass=NativeDistribution,
    ext_modules=[CRC32],
    packages=[*find_packages(include=["ckptd", "ckptd.*"]), "ckptd_client"],
    package_dir={"ckptd_client": "client"},
)

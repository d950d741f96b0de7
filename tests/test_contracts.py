"""The contracts in proto/: lint clean, and the committed stubs match them."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "node_modules" / ".bin" / "buf"


def test_buf_lint_passes() -> None:
    assert BUF.exists(), "buf is missing: run deploy/install.sh --with-node-tools (npm ci)"
    result = subprocess.run(
        [str(BUF), "lint", "proto"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_contract_defect(tmp_path: Path) -> None:
    """The lint is really applied: a message named against the rules fails it."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    bad = tmp_path / "proto" / "crm" / "contacts" / "v1" / "contacts.proto"
    bad.write_text(bad.read_text() + "\nmessage bad_name { string X = 1; }\n")
    result = subprocess.run(
        [str(BUF), "lint", "proto"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "bad_name" in result.stdout + result.stderr


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    """`make proto` output equals what is committed: nobody edited stubs by hand."""
    out = tmp_path / "gen"
    out.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CRM_PROTO_OUT": str(out),
    }
    result = subprocess.run(
        ["bash", "proto/generate.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    committed = ROOT / "common" / "src" / "crm"
    generated = sorted(p.relative_to(out / "crm") for p in (out / "crm").rglob("*_pb2*.py*"))
    assert generated, "the generator produced nothing"
    for relative in generated:
        assert filecmp.cmp(out / "crm" / relative, committed / relative, shallow=False), relative

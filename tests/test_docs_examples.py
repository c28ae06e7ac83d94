"""The curl examples in docs/api.md work, run as written against the real stack."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import ApiMerchant
from tests.support.processes import ServiceProcess

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_api_guide_examples_run_end_to_end(
    api: ServiceProcess, vault: ServiceProcess, merchant: ApiMerchant
) -> None:
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    setup, *examples = blocks
    assert "export API=" in setup  # the reader's own set-up; the test supplies the same values
    script = "set -euo pipefail\n" + "\n".join(examples)
    env = {
        **os.environ,
        "API": api.url,
        "VAULT": vault.url,
        "SK": merchant.secret_key,
        "PK": merchant.publishable_key,
    }
    result = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"object":"refund"' in result.stdout
    assert '"status":"partially_refunded"' in result.stdout
    assert '"object":"list"' in result.stdout

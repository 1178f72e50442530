"""What the agent loads: cryptography (about 7 MiB) only when TLS or signing is used."""

from __future__ import annotations

import subprocess
import sys

from tests.support.agent import REPO_ROOT


def test_an_agent_without_tls_or_keys_does_not_load_cryptography() -> None:
    code = ("import sys, edge.agent, edge.cli, edge.desired, edge.uplink\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT, check=True)
    assert done.stdout.strip() == "[]"

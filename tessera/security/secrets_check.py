"""detect-secrets over the repository's tracked files, with every built-in detector plus the
project's card-number detector (`luhn_secrets`); fails on any finding that `.secrets.baseline`
does not list. Never prints a finding's value: only file, line and kind.

    python -m tessera.security.secrets_check            # the check (exit 1 on a new finding)
    python -m tessera.security.secrets_check --update   # rewrite the baseline (then review it)

Why not `detect-secrets scan` and `detect-secrets-hook` as they are: the CLI stores a custom
plugin's absolute path in the baseline (a CI clone lives elsewhere), and the hook rewrites the
baseline when line numbers move (exit 3). Here the plugin path is relative to the repository,
secrets are matched by file, kind and hash (not line), and nothing is verified over the
network.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from detect_secrets.core import baseline
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.core.secrets_collection import SecretsCollection
from detect_secrets.settings import transient_settings

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ".secrets.baseline"
PLUGIN = {"name": "LuhnCardNumberDetector", "path": "file://tessera/security/luhn_secrets.py"}
#: Lock files (hashes by the hundred), images and the baseline itself are not scanned.
EXCLUDED = re.compile(r"(^|/)(uv\.lock|\.secrets\.baseline)$|\.(png|jpe?g|svg|ico|pdf|gif)$")
VERIFICATION = "detect_secrets.filters.common.is_ignored_due_to_verification_policies"
#: Lines that hold a Subresource Integrity value (`"integrity": "sha384-…"`): a public digest of
#: a public script, high in entropy by nature, never a secret (vault/elements/inventory.json).
SRI_LINE = r'"integrity": "sha(256|384|512)-[A-Za-z0-9+/]+={0,2}",?$'
LINE_FILTER = "detect_secrets.filters.regex.should_exclude_line"


def tracked_files(root: Path) -> list[str]:
    listed = subprocess.run(  # git from PATH, as a developer runs it # nosec B607
        ["git", "ls-files", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(
        name
        for name in listed.split("\0")
        if name and not EXCLUDED.search(name) and (root / name).is_file()
    )


def scan(files: list[str]) -> tuple[SecretsCollection, dict[str, Any]]:
    """The findings and the baseline that records them. Run from the repository's root: the
    plugin's path and the file names are relative to it."""
    classes: list[type] = list(get_mapping_from_secret_type_to_class().values())
    built_in = [{"name": plugin_class.__name__} for plugin_class in classes]
    with transient_settings({"plugins_used": [*built_in, PLUGIN]}) as settings:
        get_mapping_from_secret_type_to_class.cache_clear()  # built before our plugin was named
        settings.disable_filters(VERIFICATION)  # no network: findings are not "verified"
        settings.filters[LINE_FILTER] = {"pattern": [SRI_LINE]}  # added to the default filters
        found = SecretsCollection()
        found.scan_files(*files, num_processors=2)
        output = baseline.format_for_output(found)
    return found, output


def check(root: Path, update: bool = False) -> int:
    """0: nothing outside the baseline (or the baseline rewritten); 1: new findings."""
    os.chdir(root)  # the plugin's path and the baseline's file names are relative to it
    files = tracked_files(root)
    found, output = scan(files)
    if update:
        baseline.save_to_file(output, BASELINE)
        print(f"detect-secrets: baseline rewritten ({sum(1 for _ in found)} findings)")
        return 0
    accepted = baseline.load(baseline.load_from_file(BASELINE), BASELINE)
    new = found - accepted
    if new:
        print(f"detect-secrets: {sum(1 for _ in new)} finding(s) not in {BASELINE}:")
        for filename, secret in sorted(new, key=lambda item: (item[0], item[1].line_number)):
            print(f"  {filename}:{secret.line_number}: {secret.type}")
        print(
            "Remove the secret (a real one is compromised: rotate it), or, for a false "
            "positive, add `# pragma: allowlist secret` or run "
            "`python -m tessera.security.secrets_check --update` and commit the reviewed baseline."
        )
        return 1
    print(f"detect-secrets: {len(files)} files, no finding outside the baseline")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the baseline")
    args = parser.parse_args(argv)
    return check(ROOT, update=args.update)


if __name__ == "__main__":
    sys.exit(main())

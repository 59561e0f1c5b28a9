"""CI (``.ci/run``) runs what the README tells a user to run: the set-up and test command,
the parity recipe's installs, lint before the tests, and the parity tests required."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def commands(text: str) -> list[str]:
    """Shell commands, split at ``&&``, without pip's ``-q`` and an env-var prefix."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        for cmd in line.split("&&"):
            cmd = re.sub(r"^\w+=\S+ ", "", cmd.strip()).replace(" -q", "")
            out.append(cmd)
    return out


def readme_block(after: str) -> str:
    """The first bash block of the README after the line containing ``after``."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```bash\n(.*?)```", text[text.index(after) :], re.S).group(1)


def test_ci_runs_the_readme_set_up_test_command_and_parity_recipe():
    ci_text = (ROOT / ".ci" / "run").read_text()
    ci = commands(ci_text)
    setup = commands(readme_block("Run the tests"))
    parity = commands(readme_block("## Differential tests against TorchRec and FBGEMM"))
    pip_steps = [c for c in parity if "/pip " in c]
    assert pip_steps and all(c in ci for c in setup + pip_steps), (setup, pip_steps, ci)
    test = ci.index(".venv/bin/pytest -n 2")
    assert "JAXREC_REQUIRE_PARITY=1 .venv/bin/pytest -n 2" in ci_text
    assert ci.index(".venv/bin/ruff check .") < test
    assert ci.index(".venv/bin/ruff format --check .") < test
    assert max(ci.index(c) for c in pip_steps) < test
